"""Accuracy benchmark on ../shared/data: CIFAR-10 ResNet-20/56, calibration source x bit setting.

Rows: real data (cifar10_train_subset) / bns / dgh (exact) / dgh (stale) / fdda (1 real image per class),
and the float model. All rows at W4A4 `hw`; real and dgh also at W3A8, W8A8 and W2A4 `hw` (--extra-columns,
--extra-rows). Rows in --seeded-rows run with every seed (mean ± sd over seeds), the others with the
first seed. BRECQ reconstruction in every cell. Cell: top-1 on cifar10_test_exact1017 (exact pixels);
the JSON also has top-1 agreement with the float model on cifar10_test (JPEG copy) and the seconds of
every step. Each calibration set (row, seed) is made once and serves every column.

Settings (--setting):
  full   the issue's full strength for the device. CPU: 256 images, 500 generation iterations, BRECQ
         2000 iterations per unit (Adam lr 1e-2 on V, see RECON_LR), seeds 0,1,2. GPU: 1024 images,
         1000 generation iterations, BRECQ 20000 per unit (lr 1e-3, BRECQ's own), seeds 0,1,2.
         Many CPU hours for ResNet-20 and -56: run it on an idle machine, one model per process.
  quick  256 images, 50 generation and 50 BRECQ iterations, one seed (the earlier reduced table).
  smoke  a dry run in seconds on CPU (16 images, 2 + 2 iterations, 2 seeds, 100 evaluation images):
         checks the whole pipeline and the table, numbers are meaningless.
Any count can be overridden (--n-images, --gen-iterations, --recon-iterations, --seeds, ...); the
settings really used are printed above each table and stored in the JSON.

    python benchmarks/accuracy.py --full --models resnet20                  # one model, full strength
    python benchmarks/accuracy.py --setting quick --models resnet20
    python benchmarks/accuracy.py --setting smoke --models resnet20 --out /tmp/acc.md

Writes markdown to --out (default benchmarks/results_accuracy.md) and every number to the matching .json
after every cell, so a long run can be read while it goes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zsq_fast.pipeline import run_generate, run_quantize  # noqa: E402
from zsq_fast.data import load_images_for, one_per_class, random_subset  # noqa: E402
from zsq_fast.evaluate import agreement, evaluate, predict_logits  # noqa: E402
from zsq_fast.models.zoo import load_model  # noqa: E402
from zsq_fast.report import RunReport, resolve_device, seed_everything  # noqa: E402

DATA = os.environ.get("ZSQ_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
ROWS = ["real", "bns", "dgh_exact", "dgh_stale", "fdda"]
ROW_NAMES = {"real": "real data (train images)", "bns": "bns", "dgh_exact": "dgh (exact)",
             "dgh_stale": "dgh (stale)", "fdda": "fdda (1 real image/class)"}
MAIN_COLUMN = "W4A4:hw"
EXTRA_COLUMNS = ["W3A8:hw", "W8A8:hw", "W2A4:hw"]
# (n_images, generation iterations, BRECQ iterations per unit, seeds, evaluation limit, agreement limit)
SETTINGS = {
    "full-cpu": (256, 500, 2000, "0,1,2", None, None),
    "full-gpu": (1024, 1000, 20000, "0,1,2", None, None),
    "quick": (256, 50, 50, "0", None, 2000),
    "smoke": (16, 2, 2, "0,1", 100, 100),
}
# Adam lr on the rounding variables V: BRECQ's 1e-3 is tuned for 20000 iterations; with 10x fewer the
# reconstruction had not converged at 1e-3 in benchmarks/quantize_check.py, which uses 1e-2 (see RESULTS.md).
RECON_LR = {"long": 1e-3, "short": 1e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["full", "quick", "smoke"], default="quick")
    p.add_argument("--full", action="store_const", dest="setting", const="full", help="--setting full")
    p.add_argument("--quick", action="store_const", dest="setting", const="quick", help="--setting quick")
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {ROWS}")
    p.add_argument("--main-column", default=MAIN_COLUMN, help="BITS:PRESET every row runs at")
    p.add_argument("--extra-columns", default=",".join(EXTRA_COLUMNS), help="BITS:PRESET list for --extra-rows")
    p.add_argument("--extra-rows", default="real,dgh_exact")
    p.add_argument("--seeded-rows", default="real,dgh_exact,dgh_stale", help="rows run with every seed")
    p.add_argument("--seeds", help="comma list (default: the setting's)")
    p.add_argument("--n-images", type=int)
    p.add_argument("--gen-iterations", type=int)
    p.add_argument("--recon-iterations", type=int)
    p.add_argument("--recon-lr", type=float, help="Adam lr on V (default: RECON_LR for the iteration count)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--gen-precision", choices=["fp32", "bf16"], default="fp32",
                   help="autocast of the generators' forward passes (statistics and optimizer stay fp32)")
    p.add_argument("--channels-last", action="store_true", help="generate in channels_last memory format")
    p.add_argument("--batch-size", type=int, default=32, help="BRECQ batch size")
    p.add_argument("--qdrop", type=float, default=0.0,
                   help="QDrop probability during reconstruction (0: off, BRECQ as published)")
    p.add_argument("--eval-limit", type=int, help="first N images of cifar10_test_exact1017 only")
    p.add_argument("--agreement-limit", type=int, help="first N images of cifar10_test only")
    p.add_argument("--threads", type=int, help="torch threads (CPU); recorded with the figures")
    p.add_argument("--data", default=DATA)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_accuracy.md"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve_settings(args, device) -> dict:
    """The counts really used: the setting's (for the device when full), then any override."""
    key = args.setting if args.setting != "full" else ("full-gpu" if device.type == "cuda" else "full-cpu")
    n, gen_it, rec_it, seeds, eval_limit, agree_limit = SETTINGS[key]
    rec_it = args.recon_iterations or rec_it
    cols = [c for c in args.extra_columns.split(",") if c]
    for c in [args.main_column] + cols:
        if c.count(":") != 1:
            raise SystemExit(f"bad column {c!r}: expected BITS:PRESET, e.g. W4A4:hw")
    rows = [r for r in args.rows.split(",") if r]
    for r in rows + [r for r in args.extra_rows.split(",") if r] + [r for r in args.seeded_rows.split(",") if r]:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; choose from {ROWS}")
    return {
        "setting": key, "n_images": args.n_images or n, "gen_iterations": args.gen_iterations or gen_it,
        "recon_iterations": rec_it,
        "recon_lr": args.recon_lr or RECON_LR["long" if rec_it >= 10000 else "short"],
        "seeds": [int(s) for s in (args.seeds or seeds).split(",") if s != ""],
        "eval_limit": args.eval_limit or eval_limit, "agreement_limit": args.agreement_limit or agree_limit,
        "rows": rows, "main_column": args.main_column, "extra_columns": cols,
        "extra_rows": [r for r in args.extra_rows.split(",") if r in rows],
        "seeded_rows": [r for r in args.seeded_rows.split(",") if r],
        "batch_size": args.batch_size, "qdrop": args.qdrop, "chunk_size": args.chunk_size, "device": str(device),
        "gen_precision": args.gen_precision, "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
    }


def plan(cfg: dict) -> list[tuple[str, str, int]]:
    """Every (row, column, seed) cell, calibration-set by calibration-set."""
    cells = []
    for row in cfg["rows"]:
        seeds = cfg["seeds"] if row in cfg["seeded_rows"] else cfg["seeds"][:1]
        cols = [cfg["main_column"]] + (cfg["extra_columns"] if row in cfg["extra_rows"] else [])
        cells += [(row, col, seed) for seed in seeds for col in cols]
    return cells


def calibration(src, train, row: str, seed: int, cfg: dict, progress: bool) -> tuple[torch.Tensor, float | None]:
    """The row's calibration images and, for a generator, its final whole-set BN loss."""
    n = cfg["n_images"]
    if row == "real":
        images, _ = train.take(random_subset(train.n, min(n, train.n), seed))
        return images, None
    method = row.split("_")[0]
    mode = {"dgh_exact": "exact", "dgh_stale": "stale"}.get(row)
    real = train.subset(one_per_class(train.labels, 1, seed)) if method == "fdda" else None
    images, record, _ = run_generate(src, n, method, device=torch.device(cfg["device"]), seed=seed,
                                     precision=cfg.get("gen_precision", "fp32"), iterations=cfg["gen_iterations"],
                                     chunk_size=cfg["chunk_size"], mode=mode, real=real, progress=progress,
                                     report=None, channels_last=cfg.get("channels_last", False))
    return images, record.get("final_bn_loss")


def run_model(name: str, args, cfg: dict, out: dict, report: RunReport) -> dict:
    device = torch.device(cfg["device"])
    src = load_model(name, os.path.join(args.data, "weights", f"cifar10_{name}.pt"))
    src.model.to(device)
    exact = load_images_for(os.path.join(args.data, "cifar10_test_exact1017.npz"), src.mean, src.std,
                            src.input_size, limit=cfg["eval_limit"])
    jpeg = load_images_for(os.path.join(args.data, "cifar10_test.npz"), src.mean, src.std, src.input_size,
                           limit=cfg["agreement_limit"])
    train = load_images_for(os.path.join(args.data, "cifar10_train_subset.npz"), src.mean, src.std, src.input_size)
    ref_jpeg = predict_logits(src.model, jpeg, device=device)
    result = out[name] = {"float_top1": evaluate(src.model, exact, device=device)["top1"], "n_eval": exact.n,
                          "n_agreement": jpeg.n, "settings": cfg, "calibration_s": {}, "final_bn_loss": {},
                          "cells": []}
    progress = not args.no_progress
    calib, calib_key = None, None
    for row, col, seed in plan(cfg):
        if calib_key != (row, seed):  # a calibration set serves all of its row's columns
            t0 = time.perf_counter()
            (calib, bn_loss), calib_key = calibration(src, train, row, seed, cfg, progress), (row, seed)
            result["calibration_s"][f"{row}|{seed}"] = round(time.perf_counter() - t0, 2)
            if bn_loss is not None:
                result["final_bn_loss"][f"{row}|{seed}"] = bn_loss
        bits, preset = col.split(":")
        t0 = time.perf_counter()
        q = run_quantize(src, calib, bits=bits, preset=preset, method="brecq", device=device, seed=seed,
                         precision="fp32", iterations=cfg["recon_iterations"], batch_size=cfg["batch_size"],
                         progress=progress, report=None, extra={"lr": cfg["recon_lr"],
                                                                 "qdrop": cfg.get("qdrop", 0.0)})
        t_quant = time.perf_counter() - t0
        top1 = evaluate(q, exact, device=device)["top1"]
        agree = 100 * agreement(predict_logits(q, jpeg, device=device), ref_jpeg)
        cell = {"row": row, "column": col, "seed": seed, "top1": top1, "agreement": round(agree, 3),
                "quantize_s": round(t_quant, 1), "cell_s": round(time.perf_counter() - t0, 1),
                "unit_losses": [round(u["loss"], 6) for u in q.quant_config.get("units", [])]}
        result["cells"].append(cell)
        print(f"[{name}] {row:10s} {col:10s} seed {seed}  top-1 {top1:6.2f}  agreement {agree:6.2f}  "
              f"({cell['cell_s']} s + calibration {result['calibration_s'][f'{row}|{seed}']} s)", file=sys.stderr)
        _write(args, report, out)
    return result


def summarize(cells: list[dict], row: str, col: str) -> dict | None:
    """Mean ± sd (sample sd over seeds; 0 with one seed) of a cell's top-1, agreement and seconds."""
    got = [c for c in cells if c["row"] == row and c["column"] == col]
    if not got:
        return None

    def ms(key):
        vals = [float(c[key]) for c in got]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return {"n": len(got), "top1": ms("top1"), "agreement": ms("agreement"), "cell_s": ms("cell_s")}


def _pm(mean_sd, n, digits=2) -> str:
    m, sd = mean_sd
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _gen_format(cfg: dict) -> str:
    """' (bf16 autocast, channels_last)' where generation did not run in fp32 NCHW; '' otherwise."""
    parts = ([f"{cfg['gen_precision']} autocast"] if cfg.get("gen_precision", "fp32") != "fp32" else []) + \
        (["channels_last"] if cfg.get("channels_last") else [])
    return f" ({', '.join(parts)})" if parts else ""


def _qdrop_format(cfg: dict) -> str:
    """', QDrop p = P' where reconstruction used QDrop; '' otherwise."""
    return f", QDrop p = {cfg['qdrop']:g}" if cfg.get("qdrop") else ""


def markdown(results: dict) -> str:
    out = ["## Accuracy: CIFAR-10 (benchmarks/accuracy.py)", "",
           "Cell: top-1 % on cifar10_test_exact1017 (exact pixels), mean ± sd over the n seeds where n > 1; "
           "in parentheses the wall seconds of quantize + evaluation per seed. Last column: wall seconds to "
           "make one calibration set (generation, or picking real images). BRECQ in every quantized cell.", ""]
    for name, r in results.items():
        cfg = r["settings"]
        cols = [cfg["main_column"]] + cfg["extra_columns"]
        seeds_text = (f"seeds {cfg['seeds']} for {', '.join(cfg['seeded_rows'])} (seed {cfg['seeds'][0]} for the "
                      "rest)" if cfg["seeded_rows"] else f"seed {cfg['seeds'][0]}")
        out += [f"### {name} (float top-1 {r['float_top1']:.2f} %)", "",
                f"Setting `{cfg['setting']}`: {cfg['n_images']} calibration images, {cfg['gen_iterations']} "
                f"generation iterations{_gen_format(cfg)}, {cfg['recon_iterations']} BRECQ iterations per unit (Adam lr "
                f"{cfg['recon_lr']:g} on V, batch {cfg['batch_size']}{_qdrop_format(cfg)}), {seeds_text}, "
                f"evaluation on {r['n_eval']} images, device {cfg['device']}, {cfg['threads']} thread(s).", "",
                "| calibration | n | " + " | ".join(c.replace(":", " ") for c in cols) + " | calibration s |",
                "| --- | ---: |" + " ---: |" * (len(cols) + 1)]
        for row in cfg["rows"]:
            sums = [summarize(r["cells"], row, c) for c in cols]
            n = max((s["n"] for s in sums if s), default=0)
            cal = [v for k, v in r["calibration_s"].items() if k.split("|")[0] == row]
            txt = ["–" if s is None else f"{_pm(s['top1'], s['n'])} ({s['cell_s'][0]:.0f} s)" for s in sums]
            cal_txt = f"{statistics.fmean(cal):.0f}" if cal else "–"
            out.append(f"| {ROW_NAMES[row]} | {n} | " + " | ".join(txt) + f" | {cal_txt} |")
        real, dgh = summarize(r["cells"], "real", cfg["main_column"]), summarize(r["cells"], "dgh_exact",
                                                                                   cfg["main_column"])
        if real and dgh:
            out += ["", f"dgh (exact) − real at {cfg['main_column']}: {dgh['top1'][0] - real['top1'][0]:+.2f} pt "
                        f"(target: within 0.5 pt)."]
        out.append("")
    return "\n".join(out)


def _write(args, report: RunReport, results: dict) -> None:
    with open(args.out, "w") as f:
        f.write(markdown(results) + "\n")
    report.metrics = results
    report.write(os.path.splitext(args.out)[0] + ".json")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = resolve_settings(args, device)
    seed_everything(cfg["seeds"][0])
    report = RunReport("benchmarks/accuracy.py", vars(args) | {"resolved": cfg})
    results: dict = {}
    for name in [m for m in args.models.split(",") if m]:
        run_model(name, args, cfg, results, report)
        _write(args, report, results)
    print(markdown(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
