"""BRECQ (Li et al. 2021): reconstruct the quantized model unit by unit, in data-flow order.

Each unit's input comes from the already-quantized prefix (x_q), its target from the float model
(y_fp = f_fp(x_fp)); see cache.py for how those are fetched per batch and adaround.py for the loop.
Units are residual blocks (blocks.py) for method="brecq" and single layers for method="adaround".
A block whose call is not one tensor in / one tensor out falls back to its layers, one by one.
A layer unit with an activation fused into it (hw: the stem's conv -> ReLU, whose ReLU output is the site) is
reconstructed with that activation, as BRECQ's layer reconstruction includes the activation function: the
target is the float activation's output and the activation's site quantizer is learned with the layer.
A site that no unit makes (hw: the pooling before the classifier; with layer units, a ReLU after a residual add)
is learned, when activation scales are learned, by the first unit that reads it (input_sites), if that unit's input
is the site's tensor itself or a view of it (checked on a batch: not, e.g., a BatchNorm kept float by `skip` in
between): the input is fetched unrounded and the site's quantizer rounds it on the way in. Otherwise it keeps its
calibrated scale, as do a module whose calls share one quantizer and a tensor that no layer reads.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from .. import distributed
from ..errors import UnsupportedModelError
from .adaround import ReconConfig, reconstruct
from .blocks import Unit, split_block
from .cache import UnitData, capture, quantizers_off
from .calib_data import CalibData, Layout
from .sites import parse_site


def unit_owns_site(unit: str, site: str, fused_act: str | None = None) -> bool:
    """Whether `unit` learns `site`'s quantizer: its own output sites (hw: add operands, its output), those of
    modules inside it, and the site of the activation fused into it."""
    return parse_site(site)[0] == unit or site.startswith(unit + ".") or site == fused_act


def input_sites(unit: Unit, reads: dict[str, str], settled: set[str], fused_act: str | None = None) -> list[str]:
    """The sites `unit` may learn on its input: those its layers read (reads: layer -> site) that are not its own
    (unit_owns_site) and that no unit before it read or made (settled). In data-flow order a site's maker comes
    before its readers, so such a site is made by no unit, and its first reader is the first unit to see how
    its rounding changes the network."""
    return sorted({reads[n] for n in unit.layers if n in reads and not unit_owns_site(unit.name, reads[n], fused_act)}
                  - settled)


@torch.no_grad()
def input_is_site(qmodel: nn.Module, q_unit: nn.Module, site_q: nn.Module, images: torch.Tensor) -> bool:
    """Whether q_unit's input, fetched with site_q off, rounds with site_q to the input the model gives it: the
    unit reads the site's tensor or a view of it, not a value computed from it (a BatchNorm kept float by `skip`
    in between), so rounding it on the way in is what the model does. Agreed over the ranks of a process group
    (a rank holding no image agrees)."""
    ok = True
    if images.shape[0] > 0:
        x_on, _ = capture(qmodel, q_unit, images, want_output=False)
        with quantizers_off([site_q]):
            x_off, _ = capture(qmodel, q_unit, images, want_output=False)
        # a rare flip at a rounding boundary is allowed (a GPU's non-deterministic kernels in the prefix)
        differ = ~torch.isclose(site_q(x_off), x_on, rtol=1e-5, atol=1e-6)
        ok = float(differ.float().mean()) <= 1e-3
    if distributed.active():
        bad = torch.tensor([0.0 if ok else 1.0], device=distributed.collective_device())
        ok = float(distributed.all_reduce_sum_(bad, "the input-site check")) == 0.0
    return ok


def reconstruct_model(qmodel: nn.Module, fpmodel: nn.Module, units: list[Unit], order: list[str],
                      images: CalibData, cfg: ReconConfig, *, device: torch.device, cache: str,
                      generator: torch.Generator, progress=None, site_quantizers: dict | None = None,
                      layout: Layout | None = None, output_quantizer: tuple[str, nn.Module] | None = None,
                      fused_act: dict[str, str] | None = None, reads: dict[str, str] | None = None) -> list[dict]:
    """Reconstruct every unit in turn; returns [{name, kind, layers, loss}] for the units done (plus
    with_activation and input_sites when it learned those).
    images: this rank's shard, placed in the whole set by layout (None: a single process).
    output_quantizer: (unit name, the network output's quantizer): that unit's loss is on its quantized output.
    fused_act: layer -> the site of the activation fused into it (Sites.fused_act).
    reads: layer -> the site it reads (Sites.fed_by) for the sites a reader may learn: one quantizer per site
    (a module whose calls share one quantizer is left out: fetching its reader's input unrounded would unround
    its earlier calls too)."""
    todo = deque(units)
    done: list[dict] = []
    n_total = len(units)
    sites, reads = site_quantizers or {}, reads or {}
    settled: set[str] = set()  # sites an earlier unit made or read: their scale is what the later units fit
    every = max(1, cfg.iterations // 100)
    while todo:
        unit = todo.popleft()
        q_unit, fp_unit = qmodel.get_submodule(unit.name), fpmodel.get_submodule(unit.name)
        act = (fused_act or {}).get(unit.name) if unit.kind == "layer" else None
        if act is not None and act not in (site_quantizers or {}):
            act = None
        tail = None if act is None else parse_site(act)[0]
        candidates = [s for s in input_sites(unit, reads, settled, act) if s in sites and sites[s].enabled]
        # one input tensor has one site: several mean the reads reach past the unit's input
        entry = candidates if cfg.learn_act_scale and len(candidates) == 1 else []
        try:
            if entry and not input_is_site(qmodel, q_unit, sites[entry[0]],
                                           images.rows(0, min(images.n, cfg.batch_size)).to(device)):
                entry = []
            # a unit learning its input site drops that tensor in the site's quantizer (QDrop), not by mixing in
            # the float model's input
            data = UnitData(qmodel, q_unit, fpmodel, fp_unit, images, batch_size=cfg.batch_size,
                            device=device, mode=cache, need_fp_input=cfg.qdrop > 0 and not entry,
                            fp_out=None if tail is None else fpmodel.get_submodule(tail),
                            unrounded=[sites[s] for s in entry])
        except UnsupportedModelError:  # not one tensor in, one tensor out (cache.capture)
            if unit.kind != "block":
                raise
            parts = split_block(unit, order)
            todo.extendleft(reversed(parts))
            n_total += len(parts) - 1
            continue
        k = len(done)

        def on_step(t, loss_fn, name=unit.name, k=k, n_total=n_total):
            if progress is not None and (t % every == 0 or t == cfg.iterations - 1):
                progress(k * cfg.iterations + t + 1, n_total * cfg.iterations,
                         {"stage": "reconstruct", "unit": name, "loss": loss_fn()})

        layers = [qmodel.get_submodule(n) for n in unit.layers]
        inside = [n for n in sites if unit_owns_site(unit.name, n, act)]
        post = output_quantizer[1] if output_quantizer is not None and output_quantizer[0] == unit.name else None
        loss = reconstruct(q_unit, layers, data, cfg, generator, on_step, site_quantizers=[sites[n] for n in inside],
                           layout=layout, output_quantizer=post, model_sites=list(sites.values()),
                           tail=None if tail is None else qmodel.get_submodule(tail),
                           input_sites=[sites[n] for n in entry])
        settled.update(inside, candidates)
        done.append({"name": unit.name, "kind": unit.kind, "layers": list(unit.layers), "loss": loss,
                     **({} if act is None else {"with_activation": act}), **({"input_sites": entry} if entry else {})})
        del data
    return done
