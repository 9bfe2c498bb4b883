"""Saving, loading and ONNX export of a quantized model.

save_quantized writes {"format", "config" (JSON string), "state_dict"}: integer weights (int8/uint8 up
to 8 bits), per-channel weight scales and zero points, biases, activation/output scales and zero
points, and any other float tensors of the model, plus "sha256" over config and tensors (load_quantized
refuses a file whose content does not match it). torch.load(path, weights_only=True) reads it; the file
is written to a temporary name and renamed, so it is never left half written.

load_quantized(path, model) needs the float architecture (like load_state_dict): `model` is an
instance of the same class as the one that was quantized (its weights do not matter). The recorded
BN folds and layer swaps are replayed on a copy of it, then the saved tensors are loaded (strict).

export_onnx writes QuantizeLinear/DequantizeLinear (QDQ) graphs: weights as int8/uint8 initializers
behind DequantizeLinear (per channel, axis 0), activations as Q -> DQ with int8/uint8 zero points;
below 8 bits a Clip to the b-bit range precedes Q (same result as clamping the integers). Up to 8 bits.
onnxruntime with graph optimizations disabled reproduces the fake-quant model's outputs (to float
rounding); its default optimizations fuse QDQ pairs into integer kernels (QLinearConv, with int32
biases), which changes results by a few quantization steps at most.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings

import torch
from torch import nn

from ..errors import FileFormatError, InvalidArgumentError, InvalidTypeError
from ..fileio import load_torch_file, write_atomic
from ..ops import fake_quant
from ..validate import as_device, check_finite_images, check_finite_result, probe_forward
from .fold import set_module
from .modules import QUANT_LAYERS, QuantizedModel, quant_layer_for
from .quantizer import Quantizer, QuantSpec

FORMAT = "zsq_fast.quantized"
try:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as _MAX_OPSET
except ImportError:  # private in torch; its value in torch 2.14
    _MAX_OPSET = 20


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike | io.IOBase) -> None:
    """Write the quantized model (integers, scales, config) to `path`."""
    if not isinstance(qmodel, QuantizedModel):
        raise InvalidTypeError(f"save_quantized needs a QuantizedModel from zsq_fast.quantize(), got "
                               f"{type(qmodel).__name__}")
    _check_frozen(qmodel)
    check_finite_result(qmodel)
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    config = json.dumps(qmodel.quant_config)
    payload = {"format": FORMAT, "config": config, "state_dict": state, "sha256": _digest(config, state)}
    if isinstance(path, io.IOBase):
        torch.save(payload, path)
    else:  # a temp file renamed into place: never a partial checkpoint
        write_atomic(path, lambda tmp: torch.save(payload, tmp), "quantized checkpoint")


def load_quantized(path, model: nn.Module, device: str | torch.device | None = None) -> QuantizedModel:
    """Rebuild a saved QuantizedModel on top of `model`, the float architecture (left unchanged)."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"load_quantized: model must be the float architecture (an nn.Module), got "
                               f"{type(model).__name__}")
    what = "zsq_fast quantized model checkpoint (written by save_quantized)"
    if isinstance(path, io.IOBase):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip error: not a (complete) torch file
            raise FileFormatError(f"the stream is not a {what} (torch.load: {type(e).__name__})") from None
    else:
        payload = load_torch_file(path, what)
    config, state = _checked_payload(payload, path, what)
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False
    try:
        for _, bn in config["folded_bn"]:
            set_module(m, bn, nn.Identity())
        for name, lc in config["layers"].items():
            layer = quant_layer_for(m.get_submodule(name), QuantSpec(**lc["weight"]), QuantSpec(**lc["input"]))
            if layer.bias is None and f"model.{name}.bias" in state:  # BN folding gave it a bias
                layer.bias = nn.Parameter(torch.zeros_like(state[f"model.{name}.bias"]), requires_grad=False)
            layer.freeze()
            set_module(m, name, layer)
        out_cfg = config["output"]
        out_q = None
        if out_cfg.get("quantized"):
            out_q = Quantizer(QuantSpec(**{k: v for k, v in out_cfg.items() if k != "quantized"}), 1)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise InvalidArgumentError(f"`model` does not match the architecture saved in {path!r}: "
                                   f"{_one_line(exc)}") from None
    qmodel = QuantizedModel(m, out_q, config)
    try:
        qmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"`model` does not match the saved quantized model's architecture in "
                                   f"{path!r}: {_one_line(exc)}") from None
    check_finite_result(qmodel, f"the checkpoint {path!r}")
    if device is not None:
        qmodel.to(as_device(device))
    return qmodel.eval()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def _digest(config: str, state: dict) -> str:
    """SHA-256 of the config and every tensor (name, dtype, shape, bytes): torch's zip reader does not
    check the pickled part, so a flipped bit there would otherwise load as a different model."""
    h = hashlib.sha256(config.encode())
    for k in sorted(state):
        t = state[k].detach().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())  # C order, any strides
    return h.hexdigest()


def _checked_payload(payload, path, what: str) -> tuple[dict, dict]:
    """(config, state_dict) of a loaded checkpoint; FileFormatError when it is not one of ours or its
    content does not match its checksum (files saved before checksums existed have none and load as before)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FileFormatError(f"{path!r} is not a {what}")
    digest = payload.get("sha256")
    if digest is not None:
        ok = (isinstance(digest, str) and isinstance(payload.get("config"), str)
              and isinstance(payload.get("state_dict"), dict)
              and all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()))
        try:
            ok = ok and _digest(payload["config"], payload["state_dict"]) == digest
        except (RuntimeError, TypeError, ValueError):  # tensors numpy cannot read: corrupted too
            ok = False
        if not ok:
            raise FileFormatError(f"{path!r} is a corrupted {what}: its content does not match its SHA-256 "
                                  "checksum")
    try:
        config = json.loads(payload["config"])
        state = payload["state_dict"]
        ok = (isinstance(config, dict) and isinstance(state, dict)
              and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
              and isinstance(config["layers"], dict) and isinstance(config["folded_bn"], list)
              and isinstance(config["output"], dict))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FileFormatError(f"{path!r} is a corrupted {what}: its config or state_dict is malformed")
    return config, state


def _check_frozen(qmodel: nn.Module) -> None:
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.rounding != "frozen":
            raise InvalidArgumentError(f"layer {name} is not frozen to integers (rounding={m.rounding!r})")


# ---------------------------------------------------------------- ONNX
def _onnx_int_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


class _QDQ(torch.autograd.Function):
    """Fake quantization whose ONNX form is [Clip] -> QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax, signed, lo, hi):
        s = torch.tensor([scale], dtype=torch.float32, device=x.device)
        z = torch.tensor([float(zp)], dtype=torch.float32, device=x.device)
        return fake_quant(x, s, z, qmin, qmax, None)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, signed, lo, hi):
        dt = _onnx_int_dtype(signed)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zp, dtype=dt))
        full = (-128, 127) if signed else (0, 255)
        if (qmin, qmax) != full:
            x = g.op("Clip", x, g.op("Constant", value_t=torch.tensor(lo, dtype=torch.float32)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=torch.float32)))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


def qdq_activation(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    sp = q.spec
    qmin, qmax = sp.qrange
    s = float(q.scale.detach().reshape(-1)[0])  # frozen: already an exact power of two under pow2
    z = int(q.zero_point.reshape(-1)[0]) if not sp.symmetric else 0
    s32 = torch.tensor(s, dtype=torch.float32)
    lo, hi = float((qmin - z) * s32), float((qmax - z) * s32)
    return _QDQ.apply(x, s, z, qmin, qmax, sp.signed, lo, hi)


class _DQWeight(torch.autograd.Function):
    """w_hat = s (w_int - z) per output channel; ONNX form DequantizeLinear(w_int, s, z, axis=0)."""

    @staticmethod
    def forward(ctx, w_int, scale, zp):
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        return (w_int.float() - zp.view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, w_int, scale, zp):
        return g.op("DequantizeLinear", w_int, scale, zp, axis_i=0)


def dq_weight(layer: nn.Module) -> torch.Tensor:
    q = layer.weight_quantizer
    z = q.zero_point.detach().round().to(layer.w_int.dtype)
    return _DQWeight.apply(layer.w_int, q.scale.detach().float(), z)


def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, example_input: torch.Tensor,
                opset: int = 13, dynamic_batch: bool = True) -> None:
    """Export the quantized model as an ONNX QDQ graph (onnxruntime runs it). Bit widths up to 8."""
    if not isinstance(qmodel, QuantizedModel):
        raise InvalidTypeError(f"export_onnx needs a QuantizedModel from zsq_fast.quantize(), got "
                               f"{type(qmodel).__name__}")
    _check_frozen(qmodel)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InvalidTypeError(f"opset must be an int, got {opset!r:.80}")
    if not 13 <= opset <= _MAX_OPSET:  # per-channel DequantizeLinear needs 13
        raise InvalidArgumentError(f"opset must be in [13, {_MAX_OPSET}] (per-channel DequantizeLinear needs 13; "
                                   f"{_MAX_OPSET} is torch's TorchScript exporter's newest), got {opset}")
    for name, m in qmodel.named_modules():
        if isinstance(m, Quantizer) and m.spec.bits > 8:
            raise InvalidArgumentError(f"ONNX QDQ export supports at most 8 bits; {name} has {m.spec.bits}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise InvalidTypeError(f"example_input must be a float tensor the model takes, got "
                               f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    check_finite_images(example_input, "example_input")
    qmodel = qmodel.eval()
    probe_forward(qmodel, example_input, f"example_input of shape {tuple(example_input.shape)}")
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_atomic(path, lambda tmp: torch.onnx.export(
            qmodel, (example_input,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes=axes, do_constant_folding=False), "ONNX file")
