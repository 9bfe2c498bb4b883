"""The runs the CLI and the demo share: generation and quantization with progress bars and a report.

Below both zsq_fast.cli and zsq_fast.demo (neither imports the other): the library's generate() and
quantize() with a tqdm bar, the settings checked up front (UsageError: one line, exit code 2 in the
CLI), and the run's losses, settings and reconstruction curves recorded in a RunReport.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .data import ImageSet, one_per_class
from .errors import InvalidArgumentError
from .models.zoo import LoadedModel, has_batchnorm
from .plots import UnitCurves
from .progress import Bar
from .quantize.presets import parse_bits as quant_parse_bits
from .report import LossLog, RunReport

GENERATORS = ("dgh", "bns", "fdda")
PRESETS = ("hw", "int", "academic", "dgh_paper")
ROUNDINGS = ("nearest", "adaround", "brecq")


class UsageError(InvalidArgumentError):
    """Bad command-line input (printed as one line, exit code 2)."""


# ---------------------------------------------------------------- glue around the library
class Progress(Bar):
    """A tqdm bar fed by the library's progress callbacks callback(step, total, losses) + a loss log."""

    def __init__(self, desc: str, enabled: bool = True, unit: str = "it", one_based: bool = True):
        super().__init__(desc, enabled, unit, one_based)
        self.log: LossLog | None = None

    def __call__(self, step: int, total: int, losses=None) -> None:
        if total <= 0:  # a stage notice without steps (e.g. quantize's "calibrated")
            return
        if self.log is None:
            self.log = LossLog(total)
        super().__call__(step, total, losses)
        self.log.add(step, losses, total + (0 if self.one_based else -1))

    def losses(self) -> dict:
        return self.log.to_dict() if self.log is not None else {}


def parse_bits(bits: str) -> tuple[int, int]:
    """'W4A4' -> (4, 4), checked before any long work starts (the quantizer's own parser)."""
    try:
        return quant_parse_bits(bits)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def _accepted(fn, kwargs: dict) -> dict:
    """kwargs the library function takes; an explicit setting it does not take is an error, not ignored."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise UsageError(f"{fn.__module__}.{fn.__name__} does not support {', '.join(unknown)}")
    return kwargs


def check_generator_model(model_src: LoadedModel, method: str) -> None:
    if method not in GENERATORS:
        raise UsageError(f"unknown generator {method!r}; choose from {', '.join(GENERATORS)}")
    if isinstance(model_src.model, torch.jit.ScriptModule):
        raise UsageError(f"generator {method} needs an nn.Module with hookable BatchNorm layers; "
                         f"{model_src.source} is TorchScript (load it as ARCH --weights instead)")
    if not has_batchnorm(model_src.model):
        raise UsageError(f"model {model_src.source} has no BatchNorm layers; generator {method} matches BN "
                         "statistics and cannot work without them (calibrate with real images: --images DATA)")


def run_generate(model_src: LoadedModel, n_images: int, method: str, *, device, seed: int, precision: str,
                 iterations: int | None = None, chunk_size: int | None = None, mode: str | None = None,
                 real: ImageSet | None = None, per_class: int = 1, checkpoint: str | None = None,
                 progress: bool = True, report: RunReport | None = None, extra: dict | None = None,
                 stale_refresh: str | None = None, store: str | None = None, channels_last: bool = False):
    """zsq_fast.generate with a progress bar; returns (images (N,3,S,S) on CPU, record dict, labels or None)."""
    from .generate import generate as gen

    check_generator_model(model_src, method)
    kwargs = dict(method=method, image_size=model_src.input_size, mean=model_src.mean, std=model_src.std,
                  seed=seed, device=device)
    if precision != "fp32":  # autocast inside the generator's forward passes (fp16: CUDA only)
        kwargs["amp"] = precision
    if channels_last:
        kwargs["channels_last"] = True
    if mode is not None and method != "dgh":
        raise UsageError(f"--mode exact|stale is for generator dgh only (got {method})")
    if stale_refresh is not None and mode != "stale":
        raise UsageError("--stale-refresh is for --mode stale only")
    for k, v in (("iterations", iterations), ("chunk_size", chunk_size), ("aggregation", mode),
                 ("checkpoint", checkpoint), ("stale_refresh", stale_refresh), ("store", store)):
        if v is not None:
            kwargs[k] = v
    if method == "fdda":
        if real is None or real.labels is None:
            raise UsageError("generator fdda needs real labelled images for its class centers (--real DATA)")
        rx, ry = real.take(one_per_class(real.labels, per_class, seed))
        kwargs.update(real_images=rx, real_labels=ry, images_per_class=per_class)
    elif real is not None:
        raise UsageError(f"--real is for generator fdda only (got --method {method})")
    kwargs.update(extra or {})
    bar = Progress(f"generate {method}", progress)
    kwargs["progress"] = bar
    try:
        with report.timed(f"generate_{method}") if report is not None else contextlib.nullcontext():
            images, record = gen(model_src.model.to(device), n_images, **_accepted(gen, kwargs))
    finally:
        bar.close()
    record_d = record.to_dict() if hasattr(record, "to_dict") else dict(record or {})
    labels = getattr(record, "labels", None)
    if report is not None:  # the record holds the settings, per-step losses, timings and peak memory
        report.extra.setdefault("generation", {})[method] = record_d
    return images.detach().cpu(), record_d, labels


def run_quantize(model_src: LoadedModel, calib: torch.Tensor | ImageSet, *, bits: str, preset: str, method: str,
                 device, seed: int, precision: str, iterations: int | None = None,
                 batch_size: int | None = None, progress: bool = True, report: RunReport | None = None,
                 tag: str = "", extra: dict | None = None):
    """zsq_fast.quantize (it leaves the float model unchanged) with a progress bar."""
    from .quantize import quantize as q

    parse_bits(bits)
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if method not in ROUNDINGS:
        raise UsageError(f"unknown rounding method {method!r}; choose from {', '.join(ROUNDINGS)}")
    # Reconstruction always runs in fp32 (its losses are small differences); --precision applies to
    # generation and evaluation.
    kwargs = dict(bits=bits, preset=preset, method=method, device=device, seed=seed)
    for k, v in (("iterations", iterations), ("batch_size", batch_size)):
        if v is not None:
            kwargs[k] = v
    kwargs.update(extra or {})
    bar = Progress(f"quantize {bits} {preset} {method}", progress)
    curves = UnitCurves()

    def on_progress(step, total, info=None):
        bar(step, total, info)
        curves(step, total, info)
    kwargs["progress"] = on_progress
    name = f"quantize_{tag or method}"
    try:
        with report.timed(name) if report is not None else contextlib.nullcontext():
            qmodel = q(model_src.model, calib, **_accepted(q, kwargs))
    finally:
        bar.close()
    if report is not None:
        report.losses[name] = bar.losses()
        cfg = getattr(qmodel, "quant_config", None)
        if cfg is not None:
            report.extra.setdefault("quant_config", {})[tag or method] = cfg
            report.extra.setdefault("reconstruction_curves", {})[tag or method] = curves.curves
    return qmodel
