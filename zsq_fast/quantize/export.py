"""Saving, loading and ONNX export of a quantized model.

save_quantized writes {"format", "config" (JSON string), "state_dict"}: integer weights (int8/uint8 up
to 8 bits), per-channel weight scales and zero points, biases, activation/output scales and zero
points, and any other float tensors of the model. torch.load(path, weights_only=True) reads it.

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
import io
import json
import os
import warnings

import torch
from torch import nn

from .fold import set_module
from .modules import QUANT_LAYERS, QuantizedModel, quant_layer_for
from .onnx_qdq import DOMAIN, INT4_MIN_OPSET, MAX_OPSET, lower_qdq
from .quantizer import Quantizer, QuantSpec
from .sites import attach

FORMAT = "zsq_fast.quantized"


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike | io.IOBase) -> None:
    """Write the quantized model (integers, scales, config) to `path`."""
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"save_quantized needs a QuantizedModel from zsq_fast.quantize(), got {type(qmodel).__name__}")
    _check_frozen(qmodel)
    state = {k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items()}
    torch.save({"format": FORMAT, "config": json.dumps(qmodel.quant_config), "state_dict": state}, path)


def load_quantized(path, model: nn.Module, device: str | torch.device | None = None) -> QuantizedModel:
    """Rebuild a saved QuantizedModel on top of `model`, the float architecture (left unchanged)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a file written by zsq_fast.save_quantized")
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_quantized needs the float architecture as an nn.Module, got {type(model).__name__}")
    config = json.loads(payload["config"])
    state = payload["state_dict"]
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(getattr(mod, "inplace", None), bool):
            mod.inplace = False
    try:
        for _, bn in config["folded_bn"]:
            set_module(m, bn, nn.Identity())
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
        sites = {sc["name"]: Quantizer(QuantSpec(**{k: v for k, v in sc.items() if k != "name"}), 1)
                 for sc in config.get("sites", [])}
        for name, lc in config["layers"].items():
            if lc.get("input_from") is not None:
                layer = m.get_submodule(name)
                layer.input_quantizer = sites[lc["input_from"]]
                layer.input_prequantized = lc.get("input_prequantized", True)
        attach(m, sites)
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"`model` does not match the saved quantized model's architecture: {exc}") from exc
    out_cfg = config["output"]
    out_q = None
    if out_cfg.get("quantized"):
        out_q = Quantizer(QuantSpec(**{k: v for k, v in out_cfg.items() if k != "quantized"}), 1)
    qmodel = QuantizedModel(m, out_q, config, list(sites.values()))
    try:
        qmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"`model` does not match the saved quantized model's architecture: {exc}") from exc
    if device is not None:
        qmodel.to(device)
    return qmodel.eval()


def _check_frozen(qmodel: nn.Module) -> None:
    for name, m in qmodel.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.rounding != "frozen":
            raise ValueError(f"layer {name} is not frozen to integers (rounding={m.rounding!r})")


# ---------------------------------------------------------------- ONNX
def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, example_input: torch.Tensor,
                opset: int = MAX_OPSET, dynamic_batch: bool = True) -> None:
    """Export the quantized model as an ONNX QDQ graph that onnxruntime runs as simulated. Up to 8 bits.

    opset 21 (default): grids of <= 4 bits are INT4/UINT4 tensors; opset 13-20: int8/uint8 with a Clip.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"export_onnx needs a QuantizedModel from zsq_fast.quantize(), got {type(qmodel).__name__}")
    _check_frozen(qmodel)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an int in [13, {MAX_OPSET}] (per-channel DequantizeLinear needs 13, "
                         f"INT4 needs {INT4_MIN_OPSET}), got {opset!r}")
    for name, m in qmodel.named_modules():
        if isinstance(m, Quantizer) and m.spec.bits > 8:
            raise ValueError(f"ONNX QDQ export supports at most 8 bits; {name} has {m.spec.bits}")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'zsq_fast[onnx]'") from None

    qmodel = qmodel.eval()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(qmodel, (example_input,), buf, dynamo=False, opset_version=min(opset, 20),
                          input_names=["input"], output_names=["output"], dynamic_axes=axes,
                          do_constant_folding=False, custom_opsets={DOMAIN: 1})
    model = lower_qdq(onnx.load_from_string(buf.getvalue()), opset)
    onnx.checker.check_model(model)
    onnx.save(model, path)
