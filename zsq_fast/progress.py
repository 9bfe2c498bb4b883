"""tqdm bars fed by the library's progress callbacks, callback(step, total, losses_or_info).

generate(progress=True) and quantize(progress=True) draw one as the CLI does (zsq_fast.pipeline.Progress adds a
loss log to it); a callable is called instead; None / False draw nothing.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from .errors import InvalidTypeError


class Bar:
    """A bar per stage: a new bar starts when the total changes (quantize's units each have their own)."""

    def __init__(self, desc: str, enabled: bool = True, unit: str = "it", one_based: bool = True,
                 auto_close: bool = False):
        self.desc, self.enabled, self.unit, self.one_based = desc, enabled, unit, one_based
        self.auto_close = auto_close
        self.bar: tqdm | None = None

    def __call__(self, step: int, total: int, losses=None) -> None:
        if total <= 0:  # a stage notice without steps (e.g. quantize's "calibrated")
            return
        if self.bar is None or self.bar.total != total:
            self.close()
            desc = self.desc
            if isinstance(losses, dict) and losses.get("unit"):
                desc = f"{self.desc} {losses['unit']}"
            self.bar = tqdm(total=total, desc=desc, unit=self.unit, disable=not self.enabled,
                            leave=False, dynamic_ncols=True)
        self.bar.update(max(0, step + (0 if self.one_based else 1) - self.bar.n))
        if isinstance(losses, dict) and losses:
            self.bar.set_postfix({k: (f"{float(v):.4g}" if isinstance(v, (int, float)) else str(v))
                                  for k, v in list(losses.items())[:3] if k not in ("stage", "unit")},
                                 refresh=False)
        if self.auto_close and self.bar.n >= total:
            self.close()  # the stage is done: no bar is left behind when the call returns

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_callback(progress, desc: str, signature: str):
    """The callback for a `progress` argument: True (a Bar closing itself at the end of each stage), False/None
    (None) or a callable (itself)."""
    if progress is True:
        return Bar(desc, auto_close=True)
    if progress is None or progress is False:
        return None
    if not callable(progress):
        raise InvalidTypeError(f"progress must be True (a tqdm bar), None or a callable {signature}, got "
                               f"{progress!r:.80}")
    return progress
