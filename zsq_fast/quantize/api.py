"""quantize(): float model + calibration images -> fake-quantized model (a QuantizedModel).

Steps: trace one batch with hooks -> fold BN -> calibrate activation ranges on the float model ->
swap Conv2d/Linear for quantized layers (weight scales from the calibration method) -> optional
AdaRound / BRECQ reconstruction -> freeze weights to integers -> attach .quant_config.

What a model needs: an nn.Module whose forward takes one image batch tensor and returns one tensor;
Conv2d/Linear layers as modules (functional F.conv2d calls are not seen); every BatchNorm directly
fed by a Conv2d/Linear (it is folded). Modules holding other parameters (LayerNorm, PReLU, Conv1d,
ConvTranspose2d, ...) would stay float, so they are refused unless named in `skip`. No torch.fx.
"""
from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .. import distributed
from ..errors import InvalidArgumentError, InvalidTypeError, UnsupportedModelError
from ..progress import progress_callback
from ..validate import as_device, check_finite_activation, check_finite_model, check_finite_result, probe_forward
from .adaround import ReconConfig, default_rates
from .blocks import find_blocks, find_units
from .brecq import reconstruct_model
from .cache import MODES as CACHE_MODES
from .calib_data import CalibData, layout_of
from .calibrate import METHODS as CALIBRATIONS
from .calibrate import ActObserver, weight_scale
from .canonical import canonicalize
from .fold import bns_as_convs, fold_bn, set_module
from .modules import QUANT_LAYERS, QuantizedModel, quant_layer_for
from .output import calibrate_output, output_unit
from ..ops.checks import MAX_BITS, MIN_BITS
from .presets import PRESETS, get_preset, parse_bits
from .quantizer import Quantizer
from .sites import Sites, attach, call_info, find_sites, only, parse_site
from .support import check_supported
from .trace import trace_model

METHODS = ("nearest", "adaround", "brecq")
_QUANTIZABLE = (nn.Conv2d, nn.Linear)


def _cache_mode(cache: str, data: CalibData) -> tuple[str, str]:
    """(mode, why) for the reconstruction's unit inputs/targets (cache.py); "auto" keeps a lazy source lazy."""
    if cache != "auto":
        return cache, "as requested"
    if data.lazy:
        return "recompute", (f"calibration data is a {data.describe()} (read lazily): a host cache of every "
                             "unit's inputs and targets would hold more than the images (cache='disk' keeps them "
                             "in files instead: faster, needs the disk space)")
    return "host", "calibration images are in memory: unit inputs/targets cached in host memory, copied per batch"


def _check_same_on_every_rank(settings: dict) -> None:
    """InvalidArgumentError on every rank when the ranks were given different settings (each rank would draw
    other batches or grids, and the collectives would no longer line up). Two max-reduces; no-op alone."""
    if not distributed.active():
        return
    codes = torch.tensor([float(zlib.crc32(repr(v).encode())) for v in settings.values()], dtype=torch.float64,
                         device=distributed.collective_device())
    hi = distributed.all_reduce_max_(codes.clone(), "the settings check")
    lo = -distributed.all_reduce_max_(-codes, "the settings check")
    differ = [k for k, a, b in zip(settings, hi.tolist(), lo.tolist()) if a != b]
    if differ:
        raise InvalidArgumentError(f"quantize was called with different {', '.join(differ)} on the "
                                   f"{distributed.world_size()} ranks; every rank must pass the same settings")


def _check_args(preset, method, calibration, cache, iterations, batch_size, qdrop):
    get_preset(preset)
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose one of {METHODS}")
    if calibration not in CALIBRATIONS:
        raise InvalidArgumentError(f"unknown calibration {calibration!r}; choose one of {CALIBRATIONS}")
    if cache != "auto" and cache not in CACHE_MODES:
        raise InvalidArgumentError(f"cache must be 'auto' or one of {CACHE_MODES}, got {cache!r}")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                   or iterations < 1):
        raise InvalidArgumentError(f"iterations must be a positive int or None (BRECQ default 20000), "
                                   f"got {iterations!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(qdrop, (bool, int, float)):
        raise InvalidTypeError(f"qdrop must be a bool or a probability in [0, 1), got {qdrop!r:.80}")
    p = 0.5 if qdrop is True else float(qdrop or 0.0)
    if not 0.0 <= p < 1.0:
        raise InvalidArgumentError(f"qdrop must be a bool or a probability in [0, 1), got {qdrop!r}")
    return p


def _check_numbers(lr, act_lr, reg_weight, percentile, act_samples, seed, learn_act_scale):
    # upper bounds: larger steps and weights overflow float32 in the reconstruction updates
    for name, v, zero_ok, hi in (("lr", lr, False, 1e6), ("act_lr", act_lr, False, 1e6),
                                 ("reg_weight", reg_weight, True, 1e6), ("percentile", percentile, False, 100)):
        if v is None and name in ("lr", "act_lr"):
            continue  # the default: scaled to the iteration count (adaround.default_rates)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidTypeError(f"{name} must be a number, got {v!r:.80}")
        if not (0 <= v <= hi) or (v == 0 and not zero_ok):
            raise InvalidArgumentError(f"{name} must be a number in {'[' if zero_ok else '('}0, {hi:g}], got {v!r}")
    for name, v, lo, hi in (("act_samples", act_samples, 1, math.inf), ("seed", seed, 0, 2**64 - 1)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InvalidArgumentError(f"{name} must be an int in [{lo}, {hi}], got {v!r:.80}")
    if learn_act_scale is not None and not isinstance(learn_act_scale, bool):
        raise InvalidTypeError(f"learn_act_scale must be a bool or None, got {learn_act_scale!r:.80}")


def _device(device, model: nn.Module) -> torch.device:
    if device is None:
        p0 = next(iter(model.parameters()), None)
        return p0.device if p0 is not None else torch.device("cpu")
    return as_device(device)


def _share_input_quantizers(model: nn.Module, groups: list[list[str]], quantized: set[str]) -> list[list[str]]:
    """Layers that read the same tensor get one input quantizer (the first reader's): one tensor, one grid.
    Returns the groups tied. Readers whose grids differ (a preset's first/last-layer bits) keep their own."""
    tied = []
    for group in groups:
        names = [n for n in group if n in quantized]
        if len(names) < 2:
            continue
        q0 = model.get_submodule(names[0]).input_quantizer
        same = [n for n in names[1:] if model.get_submodule(n).input_quantizer.spec == q0.spec]
        for n in same:
            model.get_submodule(n).input_quantizer = q0
        if same:
            tied.append([names[0], *same])
    return tied


def activation_quantizers(qmodel: QuantizedModel) -> list[dict]:
    """Every activation quantizer once (tensor, the layers reading it, grid, scale): what quant_config lists."""
    seen: dict[int, dict] = {}
    for site, quant in zip(qmodel.quant_config.get("sites", []), qmodel.site_quantizers):  # same order
        seen[id(quant)] = {"tensor": f"output of {site['name']}", "readers": [], **_grid(quant)}
    for name, m in qmodel.model.named_modules():
        if isinstance(m, QUANT_LAYERS) and m.input_quantizer.enabled:
            q = m.input_quantizer
            entry = seen.get(id(q))
            if entry is None:
                entry = seen[id(q)] = {"tensor": f"input of {name}", "readers": [], **_grid(q)}
            entry["readers"].append(name)
    out = list(seen.values())
    if qmodel.output_quantizer is not None:
        out.append({"tensor": "network output", "readers": [], **_grid(qmodel.output_quantizer)})
    return out


def _grid(q: Quantizer) -> dict:
    sp = q.spec
    return {"bits": sp.bits, "signed": sp.signed, "symmetric": sp.symmetric, "pow2": sp.pow2,
            "scale": float(q.effective_scale().reshape(-1)[0]),
            "zero_point": int(q.zero_point.reshape(-1)[0])}


def _no_inplace(model: nn.Module) -> None:
    """In-place activations (torchvision uses ReLU(inplace=True)) would overwrite captured tensors."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


@torch.no_grad()
def _observe_activations(model, names, data: CalibData, layout, batch_size, device, max_samples, generator,
                         found: Sites):
    """One pass of the float model over this rank's images: an ActObserver per layer input (by name), per
    site output (by name, in the second dict) and one for the network output; then each observer is
    reduced over the ranks (ranges max-reduced, samples gathered), so all ranks get the same scales."""
    obs = {n: ActObserver(max_samples, layout.total, generator) for n in names}
    site_obs = {n: ActObserver(max_samples, layout.total, generator) for n in found.sites}
    out_obs = ActObserver(max_samples, layout.total, generator)
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: _observe(obs[n], args[0], f"the input of layer {n!r}", batch)) for n in names]
    # not checked here: a non-finite site output reaches a layer's input (or the output), checked and named there
    # a site with a functional ReLU fused (sites.py) is calibrated on what the ReLU leaves: an unsigned grid
    handles += attach(model, {n: lambda out, n=n: site_obs[n].observe(
        torch.relu(out) if n in found.relu_fused else out, batch.start) for n in found.sites}, found.calls)
    batch = slice(0, 0)  # global indices of the batch running
    try:
        for i, images in data.batches(batch_size):
            batch = slice(layout.start + i, layout.start + i + images.shape[0])
            y = model(images.to(device))
            if not isinstance(y, torch.Tensor):
                raise InvalidTypeError(f"the model must return one tensor, got {type(y).__name__}")
            _observe(out_obs, y, "the model output", batch)
    finally:
        for h in handles:
            h.remove()
    for o in [*obs.values(), *site_obs.values(), out_obs]:
        o.reduce()
    return obs, site_obs, out_obs


def _observe(observer: ActObserver, x: torch.Tensor, where: str, batch: slice) -> None:
    check_finite_activation(x, where, batch)
    observer.observe(x, batch.start)


def quantize(model: nn.Module, calib_images, bits: str = "W4A4", preset: str = "hw", method: str = "nearest", *,
             calibration: str = "mse", iterations: int | None = None, batch_size: int = 32,
             device: str | torch.device | None = None,
             progress: Callable[[int, int, dict], None] | None = None, seed: int = 0,
             qdrop: bool | float = False, cache: str = "auto", learn_act_scale: bool | None = None,
             reg_weight: float = 0.01, lr: float | None = None, act_lr: float | None = None, percentile: float = 99.99,
             act_samples: int = 1 << 16, skip: Sequence[str] = (), input_bits: int | None = None) -> QuantizedModel:
    """Post-training quantization of `model` (left unchanged) with calibration images.

    bits         'W{w}A{a}' (e.g. 'W4A4', 'W3A8'), each width 2..16.
    preset       'hw', 'int', 'academic' or 'dgh_paper' (see zsq_fast.quantize.presets).
    method       'nearest' (round to nearest), 'adaround' (layer by layer) or 'brecq' (block by block,
                 with LSQ on activation scales unless learn_act_scale=False).
    calibration  initial scales: 'mse' (clipping search), 'minmax' or 'percentile' (`percentile`).
    calib_images a tensor (N, C, H, W), numpy array, list of batches, map-style Dataset (items: image or
                 (image, label)) or DataLoader over one; a Dataset or memory-mapped tensor is read per batch,
                 never whole (zsq_fast.quantize.calib_data). Inside an initialised process group: this
                 rank's shard; statistics and gradients are reduced over the ranks, and every rank returns
                 the model one process would make from the union of the shards (in rank order).
    iterations   per reconstruction unit (None = 20000, BRECQ's default); batch_size also bounds
                 device memory; cache 'auto' | 'host' | 'device' | 'recompute' | 'disk' (see zsq_fast.quantize.cache;
                 'auto': 'recompute' for a lazy source, else 'host'; the choice and why are recorded in
                 quant_config['reconstruction']).
    qdrop        True (p = 0.5) or a probability: QDrop during reconstruction.
    lr, act_lr   Adam rates on the rounding variables V and (as a relative step) on the activation scales;
                 None: BRECQ's 1e-3 / 4e-4 scaled by 20000 / iterations (adaround.default_rates), so that
                 2000 iterations converge as BRECQ's 20000 do. reg_weight: the rounding regularizer's lambda.
    progress     True (a tqdm bar per stage, as the CLI draws) or called as progress(step, total, info) with info['stage'] and, while reconstructing,
                 info['unit'] and info['loss'].
    skip         names of modules to leave float (recorded in quant_config['float_modules']).
    input_bits   bits of the network input's grid (None: the preset's; hw: 8, as images are; pass the
                 activation bits to quantize the input like any other tensor).
    Returns a QuantizedModel in eval mode; .quant_config says exactly what is quantized.
    """
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    w_bits, a_bits = parse_bits(bits)
    p_drop = _check_args(preset, method, calibration, cache, iterations, batch_size, qdrop)
    if input_bits is not None:
        if isinstance(input_bits, bool) or not isinstance(input_bits, int) or not MIN_BITS <= input_bits <= MAX_BITS:
            raise InvalidArgumentError(f"input_bits must be None or an int in [{MIN_BITS}, {MAX_BITS}], got {input_bits!r}")
    pre = get_preset(preset)
    _check_numbers(lr, act_lr, reg_weight, percentile, act_samples, seed, learn_act_scale)
    progress = progress_callback(progress, f"quantize {bits} {method}", "progress(step, total, info)")
    if not isinstance(skip, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in skip):
        raise InvalidTypeError(f"skip must be a sequence of module names, got {skip!r:.80}")
    skip = set(skip)
    names = {n for n, _ in model.named_modules()}
    if skip - names:
        raise InvalidArgumentError(f"skip names modules the model does not have: {sorted(skip - names)}")
    check_supported(model, skip)  # before any work: what would stay float is refused (support.py)
    data = CalibData(calib_images, allow_empty=distributed.active())
    layout = layout_of(data.n)  # every rank learns the shards' sizes (and fails alike if one is empty)
    _check_same_on_every_rank({"bits": bits, "preset": preset, "method": method, "calibration": calibration,
                               "seed": seed, "batch_size": batch_size, "iterations": iterations, "qdrop": qdrop,
                               "act_samples": act_samples, "image shape": data.image_shape})
    device = _device(device, model)
    check_finite_model(model)
    # e.g. float64 images for a float32 model: cast per batch
    data.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    cache, cache_reason = _cache_mode(cache, data)
    if learn_act_scale is None:
        learn_act_scale = method == "brecq"

    fork = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        fp = copy.deepcopy(model).eval().to(device)
        for prm in fp.parameters():
            prm.requires_grad_(False)
        _no_inplace(fp)
        probe = data.rows(0, 2).to(device)
        if not isinstance(probe_forward(fp, probe, f"calib_images of shape {(data.n, *data.image_shape)}"),
                          torch.Tensor):
            raise InvalidTypeError("the model must return one tensor")
        norms = canonicalize(fp, probe, keep=skip)  # library norm modules (timm BatchNormAct2d) -> plain BN
        tr = trace_model(fp, probe)
        orphans = [n for n in tr.orphan_bns if n not in skip]
        bns_as_convs(fp, orphans)  # BN -> ReLU -> Conv: a depthwise 1x1 conv, quantized like any conv (fold.py)
        pairs = [p for p in tr.bn_pairs if p[0] not in skip and p[1] not in skip]
        fold_bn(fp, pairs)
        layer_names = [n for n in tr.order if isinstance(fp.get_submodule(n), _QUANTIZABLE) and n not in skip]
        if not layer_names:
            hint = " (a bare layer: wrap it in nn.Sequential)" if isinstance(fp, _QUANTIZABLE) else ""
            raise UnsupportedModelError(f"the model has no Conv2d/Linear layer that runs{hint}; nothing to quantize")

        found = Sites()
        in_bits = pre.input_bits if input_bits is None else input_bits
        if pre.sites != "none" or pre.float_input or in_bits is not None:
            blocks = find_blocks(fp, tr.order)
            found = find_sites(fp, probe, blocks, layer_names)
            if pre.sites == "blocks":  # dgh_paper: BRECQ's block-output quantizers only
                found = only(found, found.block_outputs.values())
            elif pre.sites == "none":
                found = only(found, [])
        obs, site_obs, out_obs = _observe_activations(fp, layer_names, data, layout, batch_size, device,
                                                      act_samples, gen, found)
        if progress is not None:
            progress(1, 1, {"stage": "calibrate"})
        q_inner = copy.deepcopy(fp)
        layers_cfg = {}
        edge = {layer_names[0]: "first", layer_names[-1]: "last"}
        for name in layer_names:
            wb = ab = None
            if name in edge and pre.first_last_bits is not None:
                wb = ab = pre.first_last_bits
            if in_bits is not None and name in found.input_readers:
                ab = in_bits  # the network input's grid (8-bit images), whatever the layers' bits
            w_spec = pre.weight_spec(wb or w_bits)
            a_spec = pre.act_spec(ab or a_bits, obs[name].nonnegative)
            # int8 kernels accumulate in int32; wider grids have no such kernel (nor ONNX export)
            int32_bias = pre.int32_bias and w_spec.bits <= 8 and a_spec.bits <= 8
            layer = quant_layer_for(fp.get_submodule(name), w_spec, a_spec, int32_bias).to(device)
            layer.weight_quantizer.set_params(*weight_scale(layer.weight, w_spec, calibration,
                                                            percentile=percentile))
            layer.input_quantizer.set_params(*obs[name].scale(a_spec, calibration, percentile=percentile))
            if pre.float_input and name in found.input_readers:
                layer.input_quantizer.enabled = False  # the image stays float (dgh_paper)
            set_module(q_inner, name, layer)
            layers_cfg[name] = {"type": layer.kind, "role": edge.get(name, "inner"),
                                "weight": w_spec.to_dict(), "input": a_spec.to_dict(),
                                "bias": None if layer.bias is None else ("int32" if layer.int32_bias else "float"),
                                "input_quantized": layer.input_quantizer.enabled}
        site_q: dict[str, Quantizer] = {}
        for name in found.sites:
            spec = pre.act_spec(a_bits, site_obs[name].nonnegative)
            site_q[name] = Quantizer(spec, 1).to(device)
            site_q[name].set_params(*site_obs[name].scale(spec, calibration, percentile=percentile))
        for name, src in found.fed_by.items():  # the layer reads the site's output, already on its grid
            layer = q_inner.get_submodule(name)
            layer.input_quantizer, layer.input_prequantized = site_q[src], name not in found.via_view
            layers_cfg[name]["input"] = site_q[src].spec.to_dict()
            layers_cfg[name]["input_from"] = src
            layers_cfg[name]["input_prequantized"] = layer.input_prequantized
        attach(q_inner, site_q, found.calls)
        shared = _share_input_quantizers(q_inner, [g for g in tr.shared_inputs if g[0] not in found.fed_by],
                                         set(layer_names))
        for group in shared:
            for name in group[1:]:
                layers_cfg[name]["input_shared_with"] = group[0]
        out_q = None
        out_cfg = {"quantized": False}
        ranked = False
        if pre.quantize_output:
            o_spec = pre.act_spec(a_bits, out_obs.nonnegative)
            out_q = Quantizer(o_spec, 1).to(device)
            out_q.set_params(*out_obs.scale(o_spec, calibration, percentile=percentile))
            ranked = calibration == "mse" and calibrate_output(q_inner, fp, data, layout, out_q,
                                                               batch_size=batch_size, device=device)
            out_cfg = {"quantized": True, **o_spec.to_dict()}

        units_done: list[dict] = []
        recon = None
        if method != "nearest":
            n_iter = iterations or 20000
            lr_default, act_lr_default = default_rates(n_iter)
            recon = ReconConfig(iterations=n_iter, batch_size=batch_size,
                                lr=lr_default if lr is None else lr, reg_weight=reg_weight,
                                learn_act_scale=learn_act_scale,
                                act_lr=act_lr_default if act_lr is None else act_lr, qdrop=p_drop)
            units = find_units(q_inner, tr.order, blocks=method == "brecq")
            last = None if out_q is None else output_unit(fp, [u.name for u in units], probe)
            units_done = reconstruct_model(q_inner, fp, units, tr.order, data, recon, device=device,
                                           cache=cache, generator=gen, progress=progress, site_quantizers=site_q,
                                           layout=layout, output_quantizer=None if last is None else (last, out_q),
                                           fused_act=found.fused_act,
                                           reads={n: s for n, s in found.fed_by.items()
                                                  if parse_site(s)[0] not in found.shared_calls})
            if ranked:  # the logits changed with the rounding
                calibrate_output(q_inner, fp, data, layout, out_q, batch_size=batch_size, device=device)
        for m in [*q_inner.modules(), *site_q.values()]:
            if isinstance(m, QUANT_LAYERS):
                m.freeze()
            if isinstance(m, Quantizer):
                m.set_params(m.scale, m.zero_point)  # scales stored as exact powers of two under pow2
        if out_q is not None:
            out_q.set_params(out_q.scale, out_q.zero_point)

    config = {
        "format_version": 1,
        "bits": bits.strip().upper(),
        "preset": preset,
        "preset_rules": {k: v for k, v in vars(PRESETS[preset]).items()},
        "method": method,
        "calibration": calibration,
        "reconstruction": None if recon is None else {**vars(recon), "cache": cache, "cache_reason": cache_reason,
                                                      "seed": seed},
        "num_calibration_images": layout.total,
        "calibration_data": data.describe() if layout.total == data.n else
        f"{len(layout.counts)} ranks' shards {list(layout.counts)}, this rank's a {data.describe()}",
        "canonical_norms": norms,  # rewritten as plain BN (+ their post-ops) before the trace (canonical.py)
        "folded_bn": [list(p) for p in pairs],
        "bn_as_conv": orphans,  # BNs that could not be folded: quantized depthwise 1x1 convs (listed in layers)
        "layers": layers_cfg,
        "shared_inputs": shared,
        # a module called more than once: "caller"/"calls" (a site per call, "name@k" for call k >= 1) or
        # "shared_calls" (one quantizer for all its calls: sites.py says when)
        "sites": [{"name": n, **q.spec.to_dict(), **call_info(found, n),
                   **({"relu_fused": True} if n in found.relu_fused else {})} for n, q in site_q.items()],
        "input_bits": in_bits,
        "output": out_cfg,
        # how the output scale was chosen: "top1_preserving" (output.py) or the calibration method
        "output_calibration": None if out_q is None else ("top1_preserving" if ranked else calibration),
        "float_modules": sorted(skip),
        # Conv2d/Linear that did not run on the calibration batch stay float (e.g. an unused head)
        "not_run": sorted(n for n, m in q_inner.named_modules() if isinstance(m, _QUANTIZABLE)),
        "units": [{"name": u["name"], "kind": u["kind"], "loss": u["loss"],
                   **({"with_activation": u["with_activation"]} if "with_activation" in u else {}),
                   **({"input_sites": u["input_sites"]} if "input_sites" in u else {})}
                  for u in units_done],
    }
    qmodel = QuantizedModel(q_inner, out_q, config, list(site_q.values())).eval()
    if distributed.active():  # the ranks agree already; rank 0's values make it exact
        for t in qmodel.state_dict().values():
            t.copy_(distributed.broadcast_(t.to(distributed.collective_device()), 0, "the quantized model"))
    check_finite_result(qmodel)  # never hand back a model with NaN/inf scales, weights or biases
    config["activations"] = activation_quantizers(qmodel)
    return qmodel
