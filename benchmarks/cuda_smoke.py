"""Every kernel once per layout, dtype and alignment case, compared with zsq_fast.ops.reference.

Meant for the first minutes on a GPU, and to be run under compute-sanitizer (benchmarks/gpu_check.sh does both):
the cases cover the paths of csrc/cuda_loops.cuh — 16-byte vector groups, the scalar fallback for odd sizes and
misaligned views (a storage offset), channels-last rows, per-tensor tails, empty tensors — so an out-of-bounds or
misaligned access shows up as a sanitizer error or a mismatch here. Prints one line per case; exit 1 on a mismatch.

    python benchmarks/cuda_smoke.py [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zsq_fast.ops import reference as ref  # noqa: E402

OPS = torch.ops.zsq_fast
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _layouts(x: torch.Tensor):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.to(memory_format=torch.channels_last)
    big = torch.cat([x.reshape(-1)[:1], x.reshape(-1)]) if x.numel() else x.reshape(-1)
    yield "offset_by_one", big[1:].view(x.shape) if x.numel() else x  # misaligned for vector loads
    yield "not_dense", torch.stack([x, x], -1)[..., 0]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    err = ((a - b).abs() / (b.abs() + 1.0)).nan_to_num(0.0)
    return float(err.max())


def run(device: str) -> int:
    torch.manual_seed(0)
    bad = 0
    shapes = [(3, 5, 7, 9), (4, 16, 8, 8), (2, 3), (1, 1, 1, 1), (0, 3, 2, 2), (5, 8, 3, 3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        tol = TOL[dtype]
        cd = ref.compute_dtype(dtype)
        for shape in shapes:
            base = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
            for lname, x in _layouts(base):
                checks = {}
                c = x.shape[1]
                checks["channel_stats"] = _close(OPS.channel_stats(x), ref.channel_stats_forward(x), tol)
                running = torch.stack([torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64)]).to(device)
                merged = OPS.channel_stats(x, running, 11.0)
                want = torch.stack([running[0], running[1]]) if x.numel() == 0 else None
                if want is None:
                    n = x.numel() // max(c, 1)
                    one = ref.channel_stats_forward(x)
                    delta = one[0] - running[0]
                    want = torch.stack([running[0] + delta * (n / (11.0 + n)),
                                        running[1] + one[1] + delta.square() * (11.0 * n / (11.0 + n))])
                checks["channel_stats merge"] = _close(merged, want, tol)
                mean, gm, gv = (torch.randn(c, dtype=torch.float64, device=device) for _ in range(3))
                gs = torch.tensor(3.0, dtype=cd, device=device)
                checks["stats backward"] = _close(OPS.channel_stats_backward(x, mean, gm, gv, 100.0, gs),
                                                  ref.channel_stats_backward(x, mean, gm * 3.0, gv * 3.0, 100.0), tol)
                for axis in (-1, 1, x.dim() - 1, 0):
                    n = 1 if axis < 0 else x.shape[axis]
                    s = (torch.rand(n) * 0.3 + 0.05).to(device)
                    z = torch.randint(-2, 3, (n,)).float().to(device)
                    ax = None if axis < 0 else axis
                    checks[f"fake_quant axis {axis}"] = _close(OPS.fake_quant(x, s, z, -8, 7, axis),
                                                               ref.fake_quant_forward(x, s, z, -8, 7, ax), tol)
                    g = torch.randn_like(x)
                    gx, gsc = OPS.fake_quant_backward(g, x, s, z, -8, 7, axis, True)
                    wgx, wgs = ref.fake_quant_backward(g, x, s, z, -8, 7, ax)
                    checks[f"fake_quant bwd axis {axis}"] = max(_close(gx, wgx, tol),
                                                                _close(gsc, wgs.reshape(gsc.shape), 1e-3))
                    if x.dim() == 4 or axis < 0:
                        v = (torch.randn(x.shape, dtype=torch.float64) * 3).to(dtype).to(device)
                        v = v.to(memory_format=torch.channels_last) if lname == "channels_last" else v
                        for beta in (2.0, 7.3):
                            w_hat, reg = OPS.adaround(x, v, s, z, -8, 7, axis, False, beta, True)
                            ww, wr = ref.adaround_forward(x, v, s, z, -8, 7, ax, False, beta, True)
                            grad = OPS.adaround_backward(g, torch.tensor(0.2, dtype=cd, device=device), x, v, s,
                                                         z, -8, 7, axis, beta)
                            wgrad = ref.adaround_backward(g, torch.tensor(0.2, dtype=cd, device=device), x, v, s,
                                                          z, -8, 7, ax, beta)
                            checks[f"adaround axis {axis} beta {beta}"] = max(
                                _close(w_hat, ww, tol), _close(reg, wr, 1e-3), _close(grad, wgrad, tol))
                worst = max(checks, key=checks.get)
                ok = all(e <= (tol if "reg" not in k else 1e-3) * 10 for k, e in checks.items())
                bad += not ok
                print(f"{'ok ' if ok else 'BAD'} {str(dtype):15s} {str(shape):16s} {lname:14s} "
                      f"worst {worst}: {checks[worst]:.2e}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_smoke on {device}: {'all cases match' if not bad else f'{bad} cases differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    raise SystemExit(run(p.parse_args().device))
