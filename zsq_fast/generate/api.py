"""generate(): validate, set up the run, loop steps with checkpoints and progress, return the
images and a record."""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import distributed as zd
from ..errors import InvalidArgumentError, InvalidTypeError
from ..progress import progress_callback
from ..fileio import as_path
from ..validate import as_device, check_finite_images, check_finite_model, probe_forward
from . import bns, dgh, fdda, sharded_run, shards
from .bn_capture import BNCapture, find_bn_layers, used_layers
from .checkpoint import load_checkpoint, save_checkpoint
from .context import LossScale, Run, measure_bn_loss, output_images, to_device
from .io import IMAGENET_MEAN, IMAGENET_STD
from .losses import layer_weights
from .optim import Plateau
from .record import GenerationRecord
from .run_folder import begin_step, end_step, open_run_folder, write_output
from .store import ImageStore, choose_store, fill_store, free_host_bytes
from .streaming import stream_of
from .views import ViewParams, draw_views, margin_for

METHODS = ("dgh", "bns", "fdda")
# lambda_sigma per method: DGH paper code uses 10, MCT DataGen / ZeroQ-style matching 1.
LAMBDA_SIGMA = {"dgh": 10.0, "bns": 1.0, "fdda": 1.0}
# lr per method (RAdam, pixels in normalized space, reduce-on-plateau). The public DGH code uses 16
# for 224 px ImageNet; on the CIFAR ResNet-20 check (64 images, 60 steps) 16 also gave the lowest
# whole-set BN loss of {0.25, 1, 4, 16} (0.097 vs 1.05 / 0.37 / 0.18) with only ~5 % of the pixels at
# the clip bounds, and bns behaved alike (16: 0.118, 1: 0.132 after 40 steps). FDDA's cross-entropy
# term dominates at large steps (BN loss 2.41 at lr 16 vs 1.13 at lr 1), so it defaults to 1.
DEFAULT_LR = {"dgh": 16.0, "bns": 16.0, "fdda": 1.0}
FDDA_WEIGHTS = {"ce": 0.5, "bn": 0.2, "distort": 0.9, "center": 0.01}
# ODSL weight for dgh: MCT DataGen's PyTorch default, in per-image units fixed by its default batch
# (losses.ODSL_REF_BATCH = 32): each image adds w / 32 * L_out,i, so the chunk size does not change the
# loss. The DGH code sets it per architecture: ResNet-18 3e-7, ResNet-50 1e-7, MobileNetV2 3e-5 (at
# its batch B, w * 32 / B here). settings["odsl_units"] names the units: "per_image_ref32" now;
# "batch_mean" (each chunk added w * its mean ODSL: w / chunk_size per image; equal at chunk 32) and
# no key (w * sum_i L_out,i / N) were earlier ones. A checkpoint of other units does not resume.
DEFAULT_ODSL_WEIGHT = 1e-5
ODSL_UNITS = "per_image_ref32"
MAX_LR = 1e6  # far above any useful step; larger ones overflow float32 in the RAdam update
AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
STORES = ("host", "device", "disk", "auto")
# settings that may differ between a run and its resume (memory layout changes rounding only, like device)
_NOT_COMPARED = ("device", "store", "checkpoint_every", "channels_last", "auto")


@dataclass
class Settings:
    method: str
    n_images: int
    image_size: list
    iterations: int
    chunk_size: int
    lr: float
    seed: int
    mean: list
    std: list
    lambda_sigma: float
    layer_weighting: str
    aggregation: str
    stale_refresh: str
    augment: bool
    margin: int
    odsl_weight: float
    odsl_units: str
    odsl_form: str
    amp: str | None
    channels_last: bool
    store: str
    device: str
    min_lr: float
    patience: int
    checkpoint_every: int
    images_per_class: int
    fdda_weights: dict
    auto: dict = None  # {"amp": why, "channels_last": why} for the settings resolved from "auto"


def cpu_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AMX-BF16 tiles or AVX512-BF16): oneDNN's bf16 convolutions then
    beat fp32 (EfficientNet-Lite0 at 224 px, 2-core AMX Xeon: benchmarks/RESULTS.md); without it
    they are emulated and slower."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def _resolve_auto(amp, channels_last, device: torch.device) -> tuple:
    """amp / channels_last "auto": by device capability (a timing probe on a shared CPU is noise).
    CPU: bf16 autocast where the CPU has native bf16, else fp32, channels_last either way; CUDA: bf16 +
    channels_last where the GPU supports bf16."""
    why = {}
    if amp == "auto":
        if device.type == "cpu":
            native = cpu_native_bf16()
            amp, why["amp"] = ("bf16", "CPU has native bf16 (AMX or AVX512-BF16)") if native else \
                (None, "CPU has no native bf16: fp32")
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            amp, why["amp"] = "bf16", "GPU supports bf16"
        else:
            amp, why["amp"] = None, f"no bf16 autocast chosen on {device}"
    if channels_last == "auto":  # oneDNN's CPU convolutions run NHWC faster in fp32 and bf16 (RESULTS.md);
        channels_last = device.type == "cpu" or amp == "bf16"  # on a GPU it pays with tensor cores (bf16)
        why["channels_last"] = "CPU: oneDNN's NHWC convolutions" if device.type == "cpu" else \
            ("bf16 on the GPU" if channels_last else "fp32 on the GPU: NCHW")
    return amp, channels_last, why


def _int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value


def _number(name, value, minimum: float) -> float:
    """A finite real number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name} must be a number, got {value!r:.80}")
    if not (math.isfinite(value) and value >= minimum):
        raise InvalidArgumentError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _three(name, values) -> list[float]:
    """mean/std: 3 finite numbers (a sequence or a tensor)."""
    try:
        v = [float(x) for x in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    except (TypeError, ValueError):
        raise InvalidTypeError(f"{name} must be 3 numbers, got {values!r:.80}") from None
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        raise InvalidArgumentError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r:.80}")
    return v


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 4 for s in image_size)):
        raise InvalidArgumentError(f"image_size must be an int or (H, W) of ints >= 4, got {image_size!r}")
    return tuple(image_size)


def _probe(model, size, device):
    """One forward on a tiny batch: fails clearly when the model cannot take this image size."""
    name = f"images of image_size={size[0]}x{size[1]} (shape (N, 3, {size[0]}, {size[1]}))"
    try:
        x = torch.zeros(2, 3, *size, device=device)
    except (RuntimeError, MemoryError):  # the allocator's "not enough memory"
        raise InvalidArgumentError(f"image_size={size[0]}x{size[1]} is too large to allocate even 2 images") from None
    out = probe_forward(model, x, name)
    if not isinstance(out, torch.Tensor):
        raise InvalidTypeError(f"the model must return a tensor, got {type(out).__name__}")
    return out


def generate(model: nn.Module, n_images: int, method: str = "dgh", image_size=224, *,
             iterations: int = 1000, chunk_size: int = 128, lr: float | None = None, seed: int = 0,
             mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None, store: str = "host", amp: str | None = None,
             channels_last: bool = False, lambda_sigma: float | None = None, layer_weighting: str = "average",
             aggregation: str = "exact", stale_refresh: str = "after_update", augment: bool | None = None,
             margin: int | None = None, odsl_weight: float | None = None, odsl_form: str = "hinged",
             min_lr: float = 1e-4, patience: int | None = None,
             real_images=None, real_labels=None, images_per_class: int = 1, fdda_weights: dict | None = None,
             checkpoint=None, checkpoint_every: int = 50, progress=None):
    """Synthesize n_images calibration images for `model` from its BN statistics.

    method: "dgh" (whole-set aggregation, views, ODSL), "bns" (per-batch matching) or "fdda"
    (class centers from real_images/real_labels or a dataset of (image, label)).
    Returns (images (N, 3, H, W) in the model's normalized input space, GenerationRecord).
    The model is put in eval mode with frozen parameters during the run and restored after.

    image_size: int or (H, W). lr: None = per-method default (DEFAULT_LR). mean/std: the model's input
    normalization (pixels are clipped to [(0-mean)/std, (1-mean)/std]). device: default the model's.
    store: "host" (images + RAdam moments in pinned host memory, streamed per chunk), "device", "disk"
    (a run folder of files read and written per chunk: N is bounded by disk, not memory; the folder is
    `checkpoint`, or a temporary folder removed after the run; see run_folder.py) or "auto" (device when
    the set fits in half the free device memory, else host when it fits in half the free host memory,
    else disk; record.store says what was chosen and why).
    amp: None, "bf16" (CUDA, or CPU autocast: pays on CPUs with native bf16, see benchmarks/RESULTS.md),
    "fp16" (CUDA only) or "auto" (bf16 where the CPU has native bf16 (AMX / AVX512-BF16) or the GPU supports
    it, else None; record.settings["auto"] says what was chosen and why); the statistics, losses and the
    optimizer stay fp32/fp64. channels_last: run the model's forward on channels-last (NHWC) images (the
    store stays NCHW); "auto": on on a CPU (fp32 and bf16), on a GPU with bf16. lambda_sigma: None = 10 for dgh,
    1 otherwise.
    layer_weighting: "average" or "first_x10". aggregation (dgh): "exact" or "stale".
    stale_refresh (stale): "after_update" (default: a chunk's cached statistics are recomputed from its
    finalised images (output view) after their update, as the DGH code and MCT do, so results compare) or
    "before_update" (reuse the step's own forward: one forward per chunk fewer, a cache one update old).
    augment: None = on for dgh only; margin: None = min(image_size) // 7 when augmenting.
    odsl_weight: None = 1e-5 for dgh (MCT's default), 0 otherwise, in per-image units: each image adds
    odsl_weight / 32 * L_out,i (32: MCT's default batch, losses.ODSL_REF_BATCH), whatever chunk_size, so
    chunk_size is a memory knob only (exact dgh: the same images for any chunk size and number of ranks
    on the same device, threads and memory layout). A weight tuned at batch B elsewhere is w * 32 / B here;
    the DGH code uses 3e-7 for ResNet-18, 1e-7 for ResNet-50 and
    3e-5 for MobileNetV2. odsl_form: "hinged" or "plain".
    patience: None = max(5, iterations // 50); min_lr 1e-4 (reduce-on-plateau, factor 0.5, best loss
    forgotten after each cut as in DGH/MCT).
    fdda: real_images, real_labels, images_per_class (1), fdda_weights (ce 0.5, bn 0.2, distort 0.9,
    center 0.01). checkpoint: a path; written atomically every checkpoint_every steps and resumed from
    when it exists (store="disk": the run folder, whose state follows every step and whose images are
    synced to disk every checkpoint_every steps). progress: True (a tqdm bar) or called as progress(step, iterations,
    losses_dict) after every step.

    Inside an initialised process group of several ranks (torchrun; zsq_fast.distributed.init_from_env),
    every rank calls generate with the same arguments and gets its shard: whole chunks (fdda: whole
    single-class batches) of the set, images [record.shard["start"], record.shard["stop"]) in its own
    store; the losses in the record are the whole set's. Exact dgh gives one process's images bit for bit
    (the whole-set statistics are merged in an order fixed by the image indices); bns and fdda too (per
    batch); stale aggregation differs (a chunk sees other ranks' chunks as of the step's start).
    checkpoint is then a folder: a manifest and one checkpoint (or run folder) per rank (sharded_run.py).
    """
    settings, device = make_settings(
        model, n_images, method, image_size, iterations=iterations, chunk_size=chunk_size, lr=lr, seed=seed,
        mean=mean, std=std, device=device, store=store, amp=amp, channels_last=channels_last,
        lambda_sigma=lambda_sigma, layer_weighting=layer_weighting, aggregation=aggregation,
        stale_refresh=stale_refresh, augment=augment,
        margin=margin, odsl_weight=odsl_weight, odsl_form=odsl_form, min_lr=min_lr, patience=patience,
        images_per_class=images_per_class, fdda_weights=fdda_weights, checkpoint_every=checkpoint_every)
    if method == "fdda" and real_images is None:
        raise InvalidArgumentError("fdda needs real_images (a tensor with real_labels, or a dataset of (image, label))")
    check_finite_model(model)
    if isinstance(real_images, torch.Tensor):
        check_finite_images(real_images, "real_images")
    if checkpoint is not None:
        checkpoint = as_path(checkpoint, "checkpoint")
    progress = progress_callback(progress, f"generate {method}", "progress(step, total, losses)")
    modes = [m.training for m in model.modules()]  # per module: a model may mix train and eval parts
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return _generate(model, settings, device, real_images, real_labels, checkpoint, progress)
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


def make_settings(model, n_images, method="dgh", image_size=224, *, iterations=1000, chunk_size=128,
                  lr=None, seed=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=None, store="host",
                  amp=None, channels_last=False, lambda_sigma=None, layer_weighting="average",
                  aggregation="exact",
                  stale_refresh="after_update", augment=None,
                  margin=None, odsl_weight=None, odsl_form="hinged", min_lr=1e-4, patience=None,
                  images_per_class=1, fdda_weights=None, checkpoint_every=50) -> tuple[Settings, torch.device]:
    """Validated settings with the method's defaults filled in, and the compute device."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}")
    _int("n_images", n_images, 1)
    _int("chunk_size", chunk_size, 1)
    _int("iterations", iterations, 0)
    _int("checkpoint_every", checkpoint_every, 1)
    size = _image_size(image_size)
    if aggregation not in ("exact", "stale"):
        raise InvalidArgumentError(f"aggregation must be 'exact' or 'stale', got {aggregation!r}")
    if not isinstance(stale_refresh, str) or stale_refresh not in dgh.STALE_REFRESH:
        raise InvalidArgumentError(f"stale_refresh must be one of {dgh.STALE_REFRESH}, got {stale_refresh!r}")
    if odsl_form not in ("plain", "hinged"):
        raise InvalidArgumentError(f"odsl_form must be 'plain' or 'hinged', got {odsl_form!r}")
    if not (amp is None or isinstance(amp, str)) or (amp not in AMP and amp != "auto"):
        raise InvalidArgumentError(f"amp must be None, 'bf16', 'fp16' or 'auto', got {amp!r}")
    if not isinstance(store, str) or store not in STORES:
        raise InvalidArgumentError(f"store must be one of {STORES}, got {store!r}")
    lr = DEFAULT_LR[method] if lr is None else lr
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= MAX_LR):
        raise InvalidArgumentError(f"lr must be a number in (0, {MAX_LR:g}] (pixels span a few units), got {lr!r}")
    mean, std = _three("mean", mean), _three("std", std)
    if any(s <= 0 for s in std):
        raise InvalidArgumentError(f"std must be > 0, got {std!r}")
    for name, v in (("lambda_sigma", lambda_sigma), ("odsl_weight", odsl_weight)):
        if v is not None:
            _number(name, v, 0.0)
    _number("min_lr", min_lr, 0.0)
    if patience is not None:
        _int("patience", patience, 1)
    if _int("seed", seed, 0) > 2**64 - 1:  # torch generators take 64-bit seeds
        raise InvalidArgumentError(f"seed must be < 2**64, got {seed}")
    if fdda_weights is not None and (not isinstance(fdda_weights, dict) or set(fdda_weights) - set(FDDA_WEIGHTS)):
        raise InvalidArgumentError(f"fdda_weights must be a dict with keys from {sorted(FDDA_WEIGHTS)}, "
                                   f"got {fdda_weights!r:.120}")
    for k, v in (fdda_weights or {}).items():
        _number(f"fdda_weights[{k!r}]", v, 0.0)
    augment = (method == "dgh") if augment is None else bool(augment)
    margin = (margin_for(min(size)) if augment else 0) if margin is None else _int("margin", margin, 0)
    if margin and not augment:  # the canvas margin is only cropped away by the augmentation views
        raise InvalidArgumentError(f"margin={margin} needs augment=True (random crops from a larger canvas); "
                                   "without augmentation leave margin at None or 0")
    params = list(model.parameters()) + list(model.buffers())
    device = as_device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    if not (isinstance(channels_last, bool) or channels_last == "auto"):
        raise InvalidTypeError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
    amp, channels_last, auto = _resolve_auto(amp, channels_last, device)
    if amp == "fp16" and device.type != "cuda":
        raise InvalidArgumentError(f"amp='fp16' needs a CUDA device, the run is on {device} (use amp='bf16' on CPU)")
    if amp == "bf16" and device.type not in ("cuda", "cpu"):
        raise InvalidArgumentError(f"amp='bf16' runs on CUDA or CPU, the run is on {device}")
    settings = Settings(
        method=method, n_images=n_images, image_size=list(size), iterations=iterations, chunk_size=chunk_size,
        lr=float(lr), seed=int(seed), mean=[float(m) for m in mean], std=[float(s) for s in std],
        lambda_sigma=float(LAMBDA_SIGMA[method] if lambda_sigma is None else lambda_sigma),
        layer_weighting=layer_weighting, aggregation=aggregation, stale_refresh=stale_refresh, augment=augment,
        margin=margin,
        odsl_weight=float((DEFAULT_ODSL_WEIGHT if method == "dgh" else 0.0) if odsl_weight is None else odsl_weight),
        odsl_units=ODSL_UNITS, odsl_form=odsl_form, amp=amp, channels_last=channels_last, store=store,
        device=str(device), min_lr=float(min_lr),
        patience=int(max(5, iterations // 50) if patience is None else patience),
        checkpoint_every=checkpoint_every, images_per_class=images_per_class,
        fdda_weights={**FDDA_WEIGHTS, **(fdda_weights or {})} if method == "fdda" else {}, auto=auto)
    try:
        layer_weights(2, layer_weighting)  # validates the name early
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(str(e)) from None
    _int("images_per_class", images_per_class, 1)
    return settings, device


def compared_settings(s: Settings) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    return {k: v for k, v in asdict(s).items() if k not in _NOT_COMPARED}


def canvas_shape(s: Settings, n: int | None = None) -> tuple[int, int, int, int]:
    """(N, 3, Hc, Wc) of the whole set, or of n images (a rank's shard)."""
    return (s.n_images if n is None else n, 3, s.image_size[0] + s.margin, s.image_size[1] + s.margin)


def build_run(model, s: Settings, device, store: str | None = None, folder=None,
              shard: shards.Shard | None = None) -> tuple[Run, torch.Tensor]:
    """The run state before step 1 (and the model's output on a probe batch). The model must
    already be in eval mode; enter run.capture before any forward. store: the resolved store kind
    (default s.store; "auto" is resolved by generate()); folder: the run folder of store "disk", whose
    saved state (None on a fresh start) goes to run.state["saved"]. shard: this rank's images of the
    set (None: all of them); the store holds those only."""
    size = tuple(s.image_size)
    layers = find_bn_layers(model)
    out = _probe(model, size, device)
    layers = used_layers(model, layers, torch.zeros(2, 3, *size, device=device))
    mean = torch.tensor(s.mean, device=device)
    std = torch.tensor(s.std, device=device)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    targets = [(torch.zeros(3, device=device), torch.ones(3, device=device))]
    targets += [(l.mean.to(device), l.std.to(device)) for l in layers]
    generator = torch.Generator().manual_seed(s.seed)  # views and fdda's noise, alike on every rank
    start, stop = (0, s.n_images) if shard is None else (shard.start, shard.stop)
    shape = canvas_shape(s, stop - start)

    def initial_blocks():  # each image's noise depends on the seed and its index only
        return shards.initial_canvases(s.seed, canvas_shape(s), lo, hi, start, stop)
    kind = s.store if store is None else store
    saved = None
    if kind == "disk":
        if folder is None:
            raise InvalidArgumentError("store='disk' needs a run folder (generate's checkpoint=FOLDER)")
        image_store, saved = open_run_folder(folder, compared_settings(s), shape, initial_blocks)
    elif kind in ("host", "device"):
        need = 3 * 4 * math.prod(shape)  # images + two RAdam moments, float32
        too_big = f"n_images={shape[0]} at image_size={size[0]}x{size[1]} needs about {need / 2**30:.3g} GiB " \
                  "for the images and optimizer state"
        if kind == "host" and need > free_host_bytes():
            raise InvalidArgumentError(f"{too_big}, more than this machine has free; generate fewer images per "
                                       "call or use store='disk'")
        try:
            image_store = fill_store(shape, initial_blocks(), torch.device("cpu") if kind == "host" else device)
        except (RuntimeError, MemoryError):  # the allocator's "not enough memory"
            raise InvalidArgumentError(f"{too_big}, more than this machine can allocate") from None
    else:
        raise InvalidArgumentError(f"build_run needs a resolved store kind, got {kind!r}")
    capture = BNCapture(layers)
    run = Run(model=model, layers=layers, capture=capture, targets=targets,
              weights=layer_weights(len(targets), s.layer_weighting), lambda_sigma=s.lambda_sigma,
              store=image_store, device=device, chunk_size=s.chunk_size, size=size, lo=lo, hi=hi,
              generator=generator, plateau=Plateau(lr=s.lr, patience=s.patience, min_lr=s.min_lr),
              augment=s.augment, odsl_weight=s.odsl_weight, odsl_hinged=s.odsl_form == "hinged",
              amp_dtype=AMP[s.amp], channels_last=s.channels_last, loss_scale=LossScale() if s.amp == "fp16" else None,
              shard=shard)
    run.state["stale_refresh"] = s.stale_refresh
    run.state["saved"] = saved
    return run, out


def _resolve_store(s: Settings, device, checkpoint, n: int | None = None) -> dict:
    """{"kind", "reason", "folder"}: where this run keeps its images and moments."""
    kind, reason = s.store, "requested"
    if kind == "auto":  # a run resumes where it was stored, whatever memory is free now
        existing = None if checkpoint is None else Path(checkpoint)
        if existing is not None and (existing / "run.json").exists():
            kind, reason = "disk", f"resuming the run folder {existing}"
        elif existing is not None and existing.is_file():
            kind, reason = ("device" if device.type == "cuda" else "host"), f"resuming the checkpoint file {existing}"
        else:
            kind, reason = choose_store(3 * 4 * math.prod(canvas_shape(s, n)), device)
    if kind == "device" and device.type == "cpu":
        kind = "host"
    folder, temporary = None, False
    if kind == "disk":
        temporary = checkpoint is None
        folder = tempfile.mkdtemp(prefix="zsq_fast_run_") if temporary else str(checkpoint)
    return {"kind": kind, "reason": reason, "folder": folder, "temporary": temporary}


def _store_note(placed: dict) -> dict:
    note = {"kind": placed["kind"], "reason": placed["reason"]}
    if placed["folder"] is not None and not placed["temporary"]:
        note["folder"] = placed["folder"]
    return note


def _generate(model, s: Settings, device, real_images, real_labels, checkpoint, progress):
    shard = _plan_shard(model, s, device, real_images, real_labels) if zd.active() else None
    if shard is not None and checkpoint is not None:  # a folder: the manifest and one entry per rank
        own = Path(checkpoint) / sharded_run.rank_name(shard.rank)
        guess = own if s.store == "disk" or (own / "run.json").exists() else own.with_suffix(".pt")
        placed = _resolve_store(s, device, guess, shard.n)
        checkpoint = sharded_run.prepare_checkpoint(checkpoint, shard, placed["kind"] == "disk")
        if placed["kind"] == "disk":
            placed["folder"] = str(checkpoint)
    else:
        placed = _resolve_store(s, device, checkpoint, None if shard is None else shard.n)
    try:
        return _generate_in(model, s, device, real_images, real_labels, checkpoint, progress, placed, shard)
    finally:
        if placed.get("stream") is not None:  # its I/O thread finishes before the folder is reused or removed
            placed["stream"].close()
        if placed["temporary"]:  # the returned images stay readable: a mapped file outlives its name
            shutil.rmtree(placed["folder"], ignore_errors=True)


def _plan_shard(model, s: Settings, device, real_images, real_labels) -> shards.Shard:
    """This rank's part of the set: whole chunks (dgh, bns) or whole single-class batches (fdda)."""
    if s.method != "fdda":
        return shards.plan(shards.chunk_units(s.n_images, s.chunk_size), s.n_images)
    num_classes = _probe(model, tuple(s.image_size), device).shape[-1]
    _, y = _real_per_class(s, real_images, real_labels, num_classes)
    classes = torch.unique(y)
    labels = fdda.synthetic_labels(s.n_images, classes)
    return shards.plan([sl for _, sl in fdda.class_batches(labels, classes, s.chunk_size)], s.n_images,
                       what="single-class batches")


def _exit_for_test(step: int, when: str = "begin") -> None:
    """ZSQ_FAST_TEST_EXIT=RANK:STEP ends that rank abruptly when STEP begins, RANK:STEP:commit just before
    it commits STEP (after the step's last collective) (the killed-rank tests)."""
    spec = os.environ.get("ZSQ_FAST_TEST_EXIT")
    if spec and spec == f"{zd.rank()}:{step}" + ("" if when == "begin" else f":{when}"):
        os._exit(17)


def _generate_in(model, s: Settings, device, real_images, real_labels, checkpoint, progress, placed, shard=None):
    t_start = time.perf_counter()
    heart = zd.Heartbeat("generate")  # names a rank that dies mid-run (every rank makes the same calls)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    disk = placed["kind"] == "disk"
    if shard is None:
        run, out = build_run(model, s, device, placed["kind"], placed["folder"])
    else:  # a rank whose store or run folder fails ends every rank at once
        run, out = sharded_run.agreed(lambda: build_run(model, s, device, placed["kind"], placed["folder"], shard),
                                      "setting up the image store")
    placed["stream"] = stream_of(run)
    layers, capture = run.layers, run.capture
    compared = compared_settings(s)
    with capture:
        if s.method == "fdda":
            _setup_fdda(run, s, real_images, real_labels, out.shape[-1])
        step_fn = {"bns": bns.bns_step, "fdda": fdda.fdda_step,
                   "dgh": dgh.exact_step if s.aggregation == "exact" else dgh.stale_step}[s.method]
        history, resumed = [], None
        if disk:  # the run folder is the checkpoint
            saved = run.state.pop("saved")
            if shard is not None:
                saved = sharded_run.agree_on_step(run.store, saved)
        elif shard is not None and checkpoint is not None:
            saved = sharded_run.load_rank_checkpoint(checkpoint, compared, shard.n)
        else:
            saved = load_checkpoint(checkpoint, compared) if checkpoint is not None else None
        if saved is not None:
            resumed = _restore(run, saved)
            history, initial_bn = saved["history"], saved["initial_bn_loss"]
        else:
            initial_bn = measure_bn_loss(run)
            if s.method == "dgh" and s.aggregation == "stale":
                dgh.init_stale_cache(run, _views(run, s))
        t_setup = time.perf_counter() - t_start
        t_loop = time.perf_counter()
        for step in range(run.step + 1, s.iterations + 1):
            run.step = step
            _exit_for_test(step)
            heart.beat(step)
            if disk:
                begin_step(run.store, step)
            views = _views(run, s)
            lr_used = run.plateau.lr
            try:
                losses = step_fn(run, views)
            except zd.DistributedError as e:
                raise heart.failed("generation step", step, e) from e
            run.plateau.step(losses.get("schedule", losses["total"]))
            history.append({"step": step, "lr": lr_used, **losses})
            _exit_for_test(step, "commit")
            if disk:  # every step: images are updated in place, the state must follow them
                end_step(run.store, _state(run, compared, history, initial_bn, images=False),
                         sync=step % s.checkpoint_every == 0 or step == s.iterations)
            elif checkpoint is not None and (step % s.checkpoint_every == 0 or step == s.iterations):
                save = save_checkpoint if shard is None else sharded_run.save_rank_checkpoint
                save(checkpoint, _state(run, compared, history, initial_bn))
            if progress is not None:
                progress(step, s.iterations, losses)
        steps_done = len(history)
        t_steps = time.perf_counter() - t_loop
        t_final = time.perf_counter()
        final_bn = measure_bn_loss(run)
        images = _output(run)
    if disk:
        run.store.close()
    timings = {"setup_s": t_setup, "steps_s": t_steps,
               "per_step_s": t_steps / max(1, s.iterations - (resumed or 0)),
               "final_s": time.perf_counter() - t_final, "total_s": time.perf_counter() - t_start}
    if device.type == "cuda":
        peak = {"device": str(device), "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    else:
        peak = {"device": "cpu", "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    record = GenerationRecord(
        settings=json.loads(json.dumps(asdict(s))), losses=history, initial_bn_loss=initial_bn,
        final_bn_loss=final_bn, timings=timings, peak_memory=peak, bn_layers=[l.name for l in layers],
        steps_done=steps_done, resumed_from_step=resumed,
        labels=run.state["labels"].clone() if s.method == "fdda" else None,
        store=_store_note(placed), shard=None if shard is None else shard.note())
    return images, record


def _views(run: Run, s: Settings):
    """This step's views of this rank's images, drawn for the whole set (alike on every rank)."""
    if not s.augment:
        return None
    views = draw_views(run.n_all, s.margin, run.generator)
    views = views if run.shard is None else views[run.shard.start:run.shard.stop]
    # on the device once per step: each chunk's view would otherwise copy its slice there, a sync per chunk
    return ViewParams(*(to_device(run, t) for t in (views.flip, views.top, views.left)))


def _real_per_class(s: Settings, real_images, real_labels, num_classes: int):
    """fdda's real images per class (checked), as the shard plan and the class centers use them."""
    try:
        x, y = fdda.select_per_class(real_images, real_labels, s.images_per_class, num_classes)
    except (TypeError, ValueError, IndexError, RuntimeError) as e:  # fdda's checks, torch's conversions
        raise InvalidArgumentError(f"real_images/real_labels: {e}") from None
    check_finite_images(x, "real_images")
    if tuple(x.shape[1:]) != (3, *s.image_size):
        raise InvalidArgumentError(f"fdda: real images have shape {tuple(x.shape[1:])}, expected "
                                   f"(3, {s.image_size[0]}, {s.image_size[1]}) in the model's normalized input space")
    return x, y


def _setup_fdda(run: Run, s: Settings, real_images, real_labels, num_classes: int) -> None:
    x, y = _real_per_class(s, real_images, real_labels, num_classes)
    centers = fdda.class_centers(run, x, y)
    if run.shard is not None:  # every rank uses rank 0's centers (GPUs may round their forwards differently)
        centers = zd.broadcast_object(fdda.ClassCenters(centers.classes.cpu(), [m.cpu() for m in centers.mean],
                                                        [v.cpu() for v in centers.var]), what="the fdda class centers")
        centers = fdda.ClassCenters(centers.classes, [m.to(run.device) for m in centers.mean],
                                    [v.to(run.device) for v in centers.var])
    labels = fdda.synthetic_labels(run.n_all, centers.classes)
    batches = fdda.class_batches(labels, centers.classes, run.chunk_size)
    if run.shard is not None:  # this rank's batches, as slices of its store
        sh = run.shard
        batches = [(k, sh.local(sl)) for k, sl in batches if sh.start <= sl.start < sh.stop]
        labels = labels[sh.start:sh.stop]
    run.state.update(centers=centers, labels=labels, batches=batches, weights=s.fdda_weights,
                     noise_mean_std=0.5, noise_var_std=1.0)


@torch.no_grad()
def _output(run: Run) -> torch.Tensor:
    if not isinstance(run.store, ImageStore):  # disk: written to the run folder, returned memory-mapped
        chunks = stream_of(run).chunks(run.store.chunks(run.chunk_size))
        return write_output(run.store, (run.n, 3, *run.size), ((sl, output_images(run, x)) for sl, x in chunks))
    if not run.augment:
        return run.store.x.clone()
    out = torch.empty(run.n, 3, *run.size, dtype=torch.float32, device=run.store.x.device)
    for sl, x in stream_of(run).chunks(run.store.chunks(run.chunk_size)):
        out[sl] = output_images(run, x).to(out.device)
    return out


def _state(run: Run, compared: dict, history: list, initial_bn: float, images: bool = True) -> dict:
    """The checkpoint: everything the next step depends on (images and moments unless they live on disk)."""
    arrays = {"x": run.store.x.cpu(), "exp_avg": run.store.exp_avg.cpu(),
              "exp_avg_sq": run.store.exp_avg_sq.cpu()} if images else {}
    return {"settings": json.dumps(compared), "step": run.step, **arrays,
            "plateau": run.plateau.state(), "generator": run.generator.get_state(),
            "history": history, "initial_bn_loss": initial_bn, "stale_cache": dgh.cache_state(run),
            "loss_scale": run.loss_scale.state() if run.loss_scale is not None else {}}


def _restore(run: Run, saved: dict) -> int:
    if "x" in saved:  # a checkpoint file; a run folder holds its images already
        run.store.put(slice(None), saved["x"], saved["exp_avg"], saved["exp_avg_sq"])
    for k, v in saved["plateau"].items():
        setattr(run.plateau, k, v)
    run.generator.set_state(saved["generator"])
    run.step = int(saved["step"])
    dgh.restore_cache(run, saved["stale_cache"])
    if run.loss_scale is not None and saved.get("loss_scale"):
        run.loss_scale.value = float(saved["loss_scale"]["value"])
        run.loss_scale.clean = int(saved["loss_scale"]["clean"])
    return run.step
