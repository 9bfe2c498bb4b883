"""The network output's quantizer (the logits): a calibration that keeps each image's top-1.

Logits are read by an argmax, not by another layer: an MSE-optimal clipping of a 1000-class output fits the
bulk of small logits and saturates the leading ones at qmax, where they tie (4 bits). The scale is chosen by
calibrate.top1_preserving_scale on the quantized network's own logits (what the output quantizer will see),
against the float model's top-1, once after the layers are quantized and again after reconstruction. During
reconstruction the unit producing the logits is trained through the output quantizer (its loss is on the
quantized logits), with the scale held: LSQ on that MSE loss would pull it back to the clipping that ties.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibrate import top1_preserving_scale
from .quantizer import Quantizer

MAX_IMAGES = 256  # images whose logits choose the scale: enough to see ties, cheap for a 1000-class head


@torch.no_grad()
def calibrate_output(q_model: nn.Module, fp_model: nn.Module, images: torch.Tensor, out_q: Quantizer, *,
                     batch_size: int, device: torch.device) -> bool:
    """Set out_q's scale from q_model's logits on the first MAX_IMAGES images. False (scale unchanged) when
    the output has no class axis of at least 2 entries (nothing to rank)."""
    logits, top1 = [], []
    for i in range(0, min(images.shape[0], MAX_IMAGES), batch_size):
        x = images[i:min(i + batch_size, MAX_IMAGES)].to(device)
        y = q_model(x)
        if y.dim() < 2 or y.shape[1] < 2:
            return False
        logits.append(y)
        top1.append(fp_model(x).argmax(1))
    out_q.set_params(*top1_preserving_scale(torch.cat(logits), torch.cat(top1), out_q.spec))
    return True


@torch.no_grad()
def output_unit(model: nn.Module, names: list[str], example: torch.Tensor) -> str | None:
    """The one of `names` (reconstruction units) whose output is the network output itself, if any."""
    outs: dict[str, int] = {}
    keep = []  # the outputs stay alive, so their ids stay unique

    def seen(name):
        def hook(m, args, out):
            keep.append(out)
            outs.setdefault(name, id(out))
        return hook
    handles = [model.get_submodule(n).register_forward_hook(seen(n)) for n in names]
    try:
        y = model(example)
    finally:
        for h in handles:
            h.remove()
    return next((n for n in reversed(names) if outs.get(n) == id(y)), None)
