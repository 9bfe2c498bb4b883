"""Saving, loading and ONNX export of a quantized model.

save_quantized writes {"format", "config" (JSON string), "state_dict"}: integer weights (int8/uint8 up
to 8 bits), per-channel weight scales and zero points, biases, activation/output scales and zero
points, and any other float tensors of the model, plus "sha256" over config and tensors (load_quantized
refuses a file whose content does not match it). torch.load(path, weights_only=True) reads it; the file
is written to a temporary name and renamed, so it is never left half written.

load_quantized(path, model) needs the float architecture (like load_state_dict): `model` is an
instance of the same class as the one that was quantized (its weights do not matter). The recorded
BN folds and layer swaps are replayed on a copy of it, then the saved tensors are loaded (strict).

export_onnx writes QuantizeLinear/DequantizeLinear (QDQ) graphs (see onnx_qdq.py): weights as integer
initializers behind DequantizeLinear (per channel, axis 0), activations as Q -> DQ, INT4/UINT4 for grids
of <= 4 bits at opset 21, int8/uint8 otherwise with a Clip where the grid is narrower; under the hw preset
biases as int32 initializers at s_x s_w. Up to 8 bits. onnxruntime gives the fake-quant model's outputs
with its default optimizations as well as with none (hw; bit for bit on the tested models, see
zsq_fast.onnx_eval.evaluate_onnx to measure it on yours).
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
from ..validate import as_device, check_finite_images, check_finite_result, probe_forward
from .canonical import rewrite_norms
from .fold import bns_as_convs, set_module
from .modules import QUANT_LAYERS, QuantizedModel, quant_layer_for
from .onnx_pools import exportable_adaptive_pools
from .onnx_qdq import DOMAIN, INT4_MIN_OPSET, MAX_OPSET, lower_qdq
from .quantizer import Quantizer, QuantSpec
from .sites import attach, calls_from_config

FORMAT = "zsq_fast.quantized"


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
        rewrite_norms(m, config.get("canonical_norms", []))  # as quantize did, before folding
        for _, bn in config["folded_bn"]:
            set_module(m, bn, nn.Identity())
        bns_as_convs(m, config.get("bn_as_conv", []))  # values come from the state dict
        for name, lc in config["layers"].items():
            layer = quant_layer_for(m.get_submodule(name), QuantSpec(**lc["weight"]), QuantSpec(**lc["input"]),
                                    int32_bias=lc.get("bias") == "int32")
            if layer.bias is None and f"model.{name}.bias" in state:  # BN folding gave it a bias
                layer.bias = nn.Parameter(torch.zeros_like(state[f"model.{name}.bias"]), requires_grad=False)
            layer.freeze()
            layer.input_quantizer.enabled = lc.get("input_quantized", True)
            set_module(m, name, layer)
        for group in config.get("shared_inputs", []):  # one quantizer per tensor, as when it was made
            for name in group[1:]:
                m.get_submodule(name).input_quantizer = m.get_submodule(group[0]).input_quantizer
        spec_keys = set(QuantSpec.__dataclass_fields__)
        sites = {sc["name"]: Quantizer(QuantSpec(**{k: v for k, v in sc.items() if k in spec_keys}), 1)
                 for sc in config.get("sites", [])}
        for name, lc in config["layers"].items():
            if lc.get("input_from") is not None:
                layer = m.get_submodule(name)
                layer.input_quantizer = sites[lc["input_from"]]
                layer.input_prequantized = lc.get("input_prequantized", True)
        attach(m, sites, calls_from_config(config.get("sites", [])))  # a site per call where it was made so
        out_cfg = config["output"]
        out_q = None
        if out_cfg.get("quantized"):
            out_q = Quantizer(QuantSpec(**{k: v for k, v in out_cfg.items() if k != "quantized"}), 1)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise InvalidArgumentError(f"`model` does not match the architecture saved in {path!r}: "
                                   f"{_one_line(exc)}") from None
    qmodel = QuantizedModel(m, out_q, config, list(sites.values()))
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
def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, example_input: torch.Tensor,
                opset: int = MAX_OPSET, dynamic_batch: bool = True) -> None:
    """Export the quantized model as an ONNX QDQ graph that onnxruntime runs as simulated. Up to 8 bits.

    opset 21 (default): grids of <= 4 bits are INT4/UINT4 tensors; opset 13-20: int8/uint8 with a Clip.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise InvalidTypeError(f"export_onnx needs a QuantizedModel from zsq_fast.quantize(), got "
                               f"{type(qmodel).__name__}")
    _check_frozen(qmodel)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InvalidTypeError(f"opset must be an int, got {opset!r:.80}")
    if not 13 <= opset <= MAX_OPSET:
        raise InvalidArgumentError(f"opset must be in [13, {MAX_OPSET}] (per-channel DequantizeLinear needs 13, "
                                   f"INT4 needs {INT4_MIN_OPSET}), got {opset}")
    for name, m in qmodel.named_modules():
        if isinstance(m, Quantizer) and m.spec.bits > 8:
            raise InvalidArgumentError(f"ONNX QDQ export supports at most 8 bits; {name} has {m.spec.bits}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise InvalidTypeError(f"example_input must be a float tensor the model takes, got "
                               f"{getattr(example_input, 'dtype', type(example_input).__name__)}")
    check_finite_images(example_input, "example_input")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'zsq_fast[onnx]'") from None
    qmodel = qmodel.eval()
    probe_forward(qmodel, example_input, f"example_input of shape {tuple(example_input.shape)}")
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), exportable_adaptive_pools():
        warnings.simplefilter("ignore")
        # the TorchScript exporter stops at opset 20; lower_qdq rewrites the graph to the requested opset
        torch.onnx.export(qmodel, (example_input,), buf, dynamo=False, opset_version=min(opset, 20),
                          input_names=["input"], output_names=["output"], dynamic_axes=axes,
                          do_constant_folding=False, custom_opsets={DOMAIN: 1})
    model = lower_qdq(onnx.load_from_string(buf.getvalue()), opset)
    onnx.checker.check_model(model)
    write_atomic(path, lambda tmp: onnx.save(model, str(tmp)), "ONNX file")
