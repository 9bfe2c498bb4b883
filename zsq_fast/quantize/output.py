"""The network output's quantizer (the logits): a calibration that keeps each image's top-1.

Logits are read by an argmax, not by another layer: an MSE-optimal clipping of a 1000-class output fits the
bulk of small logits and saturates the leading ones at qmax, where they tie (4 bits). The scale is chosen by
calibrate.top1_preserving_scale on the quantized network's own logits (what the output quantizer will see),
against the float model's top-1, once after the layers are quantized and again after reconstruction. During
reconstruction the unit producing the logits is trained through the output quantizer (its loss is on the
quantized logits), with the scale held: LSQ on that MSE loss would pull it back to the clipping that ties.
Nothing here assumes power-of-two scales: under the `int` preset (free scales, an asymmetric output grid) the same
search runs over the 100 free-scale clippings with their zero points, where hw's collapse to about 8 exponents.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .calib_data import CalibData, Layout
from .calibrate import top1_preserving_scale
from .quantizer import Quantizer

MAX_IMAGES = 256  # images whose logits choose the scale: enough to see ties, cheap for a 1000-class head


@torch.no_grad()
def calibrate_output(q_model: nn.Module, fp_model: nn.Module, data: CalibData, layout: Layout, out_q: Quantizer, *,
                     batch_size: int, device: torch.device) -> bool:
    """Set out_q's scale from q_model's logits on the first MAX_IMAGES images of the whole set (across the
    ranks of a process group: each rank runs the ones it holds, the logits are gathered in rank order, so
    every rank picks the scale one process would). False (scale unchanged) when the output has no class
    axis of at least 2 entries (nothing to rank)."""
    probe = q_model(data.rows(0, 1).to(device))
    if probe.dim() < 2 or probe.shape[1] < 2:
        return False
    mine = max(0, min(layout.stop, MAX_IMAGES) - layout.start)  # this rank's share of the first MAX_IMAGES
    logits = [probe.new_zeros((0, *probe.shape[1:]))]
    top1 = [torch.zeros(0, dtype=torch.int64, device=device)]
    for i in range(0, mine, batch_size):
        x = data.rows(i, min(i + batch_size, mine)).to(device)
        logits.append(q_model(x))
        top1.append(fp_model(x).argmax(1))
    where = distributed.collective_device()
    all_logits = distributed.all_gather_cat(torch.cat(logits).to(where), "the output calibration's logits")
    all_top1 = distributed.all_gather_cat(torch.cat(top1).to(where), "the output calibration's top-1")
    out_q.set_params(*top1_preserving_scale(all_logits.to(device), all_top1.to(device), out_q.spec))
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
