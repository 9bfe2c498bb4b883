"""Evaluate an exported ONNX model the way users run it: onnxruntime with its default session options.

evaluate_onnx reports top-1/top-5 (with labels) and, given the fake-quant model (or its logits), the
arg-max agreement with it and the largest logit difference, also in output quantization steps. That is
the check that the accuracy measured on the fake-quant model is the accuracy of what ships.

One exception to the default options. On an x86 CPU without VNNI (AVX2 only: many AMD EPYC and older Intel
parts) onnxruntime's int8 kernels (QLinearConv, QGemm, which its default optimizations put in place of the
QDQ pattern) add pairs of u8 x s8 products in int16 with saturation (VPMADDUBSW): 2 * 255 * 127 > 32767, so a
full-range 8-bit model computes something else there (ResNet-8 W8A8: 96.7 % arg-max agreement, 6 output steps
off). There the session sets "session.x64quantprecision" = "1", which makes those kernels exact (int16
operands); the report says so and also gives what the plain default options compute ("default_options").
A deployment on such a CPU needs the same option (or 7-bit weights: W7A8).
"""
from __future__ import annotations

import os
import platform

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSet
from .evaluate import accuracy, agreement, predict_logits


EXACT_INT8 = ("session.x64quantprecision", "1")  # onnxruntime: int8 GEMM/conv operands widened to int16
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's default int8 kernels saturate on this CPU: x86-64 without VNNI (see the module
    docstring). cpuinfo: the text of /proc/cpuinfo (read when None; unreadable, e.g. not Linux: assumed to)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "x64", "i386", "i686", "x86"):
        return False  # ARM's int8 dot products accumulate in int32
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return True
    return not any(f in flags for f in _VNNI_FLAGS)


def onnx_session(path: str | os.PathLike, threads: int | None = None, exact_int8: bool | None = None):
    """onnxruntime.InferenceSession on the CPU with default options (all graph optimizations on).
    exact_int8: set EXACT_INT8 (None: where int8_saturates())."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("evaluating ONNX models needs onnxruntime: pip install 'zsq_fast[onnx]'") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    if int8_saturates() if exact_int8 is None else exact_int8:
        opts.add_session_config_entry(*EXACT_INT8)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for unreadable or invalid models
        raise ValueError(f"onnxruntime cannot load {path}: {' '.join(str(e).split())[:300]}") from None


def predict_onnx(session, data: ImageSet | torch.Tensor, *, batch_size: int = 256,
                 progress: bool = False) -> torch.Tensor:
    """Logits (N, classes) of an onnxruntime session on an ImageSet or a float tensor of images."""
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None  # exported without a dynamic batch
    batches = _batches(data, fixed or batch_size)
    n = data.n if isinstance(data, ImageSet) else data.shape[0]
    out = []
    with tqdm(total=n, desc="eval onnx", unit="img", disable=not progress, leave=False) as bar:
        for x in batches:
            z = session.run(None, {inp.name: x.float().contiguous().numpy()})[0]
            if z.ndim != 2 or z.shape[0] != x.shape[0]:
                raise ValueError(f"ONNX model output must be logits (N, classes); got shape {tuple(z.shape)}")
            out.append(torch.from_numpy(np.asarray(z, dtype=np.float32)))
            bar.update(x.shape[0])
    return torch.cat(out)


def evaluate_onnx(path: str | os.PathLike, data: ImageSet | torch.Tensor, *, reference: nn.Module | None = None,
                  reference_logits: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  batch_size: int = 256, threads: int | None = None, progress: bool = False,
                  exact_int8: bool | None = None, compare_default_options: bool = True) -> dict:
    """Run `path` through onnxruntime (default options) on `data`.

    Returns {'n', 'top1', 'top5' (with labels), 'agreement' (% of images whose arg-max equals the
    reference's), 'max_abs_logit_diff', 'max_logit_diff_steps' (in units of the reference's output
    quantization step, when it has one), 'runtime'}. `reference` is typically the QuantizedModel that was
    exported. exact_int8 (None: where int8_saturates()): the session sets EXACT_INT8; with a reference the
    result also has 'default_options', the agreement and logit difference of the plain default options (a
    second pass over the data; compare_default_options=False skips it).
    """
    exact = int8_saturates() if exact_int8 is None else bool(exact_int8)
    session = onnx_session(path, threads, exact)
    logits = predict_onnx(session, data, batch_size=batch_size, progress=progress)
    if labels is None and isinstance(data, ImageSet):
        labels = data.labels
    result: dict = {"n": logits.shape[0], "runtime": _runtime(exact, detected=exact_int8 is None)}
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({logits.shape[0]},)")
        result["top1"] = round(100 * accuracy(logits, labels, 1), 3)
        if logits.shape[1] >= 5:
            result["top5"] = round(100 * accuracy(logits, labels, 5), 3)
    if reference is not None and reference_logits is None:
        imgs = data if isinstance(data, ImageSet) else _tensor_set(data)
        p0 = next(iter(reference.parameters()), None)
        reference_logits = predict_logits(reference, imgs, batch_size=batch_size,
                                          device=p0.device if p0 is not None else "cpu")
    if reference_logits is not None:
        step = _output_step(reference)
        result.update(_compare(logits, reference_logits, step))
        if exact and compare_default_options:  # what a deployment without the option computes on this CPU
            plain = predict_onnx(onnx_session(path, threads, False), data, batch_size=batch_size, progress=progress)
            result["default_options"] = _compare(plain, reference_logits, step)
    return result


def _compare(logits: torch.Tensor, reference_logits: torch.Tensor, step: float | None) -> dict:
    diff = float((logits - reference_logits).abs().max())
    out = {"agreement": round(100 * agreement(logits, reference_logits), 3), "max_abs_logit_diff": diff}
    if step is not None:
        out["max_logit_diff_steps"] = diff / step
    return out


def _output_step(model: nn.Module | None) -> float | None:
    q = getattr(model, "output_quantizer", None)
    if q is None or q.scale.numel() != 1:
        return None
    return float(q.effective_scale().reshape(()))


def _batches(data, batch_size: int):
    if isinstance(data, ImageSet):
        for x, _ in data.batches(batch_size):
            yield x
        return
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() != 4:
        raise TypeError("data must be an ImageSet or a float tensor (N, C, H, W) in the model's input space")
    for i in range(0, data.shape[0], batch_size):
        yield data[i:i + batch_size]


def _tensor_set(x: torch.Tensor) -> ImageSet:
    return ImageSet(x.shape[0], None, "tensor", lambda i: x[i])


def _runtime(exact_int8: bool = False, detected: bool = False) -> str:
    import onnxruntime as ort

    why = " (this x86 CPU has no VNNI: the default int8 kernels saturate)" if detected else " (asked for)"
    extra = f" + {EXACT_INT8[0]}={EXACT_INT8[1]}{why}" if exact_int8 else ""
    return f"onnxruntime {ort.__version__} CPUExecutionProvider, default session options{extra}"
