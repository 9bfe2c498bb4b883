"""The record of a generation run (the CLI writes record.to_dict() as its JSON report)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationRecord:
    settings: dict                 # every setting of the run (JSON types); "odsl_units" says what odsl_weight
                                   # meant (earlier units: see api.DEFAULT_ODSL_WEIGHT)
    losses: list[dict]             # per step: {"step", "lr", "bn", "total", ...method terms}
    initial_bn_loss: float         # whole-set L_BN of the output images before/after optimization
    final_bn_loss: float
    timings: dict                  # seconds: setup, steps, per_step (mean), final, total
    peak_memory: dict              # {"device": ..., "peak_allocated_bytes": ...} on CUDA, host RSS otherwise
    bn_layers: list[str]           # names of the matched BN layers (the input image is layer 0, not listed)
    steps_done: int
    resumed_from_step: int | None = None
    labels: torch.Tensor | None = None  # fdda: the class of every image
    store: dict | None = None      # {"kind": host|device|disk, "reason": why (store="auto"), "folder": run folder}
    shard: dict | None = None      # under several ranks: {"rank", "world_size", "start", "stop", "n_images"};
                                   # the images and labels returned are this rank's [start, stop)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["labels"] = None if self.labels is None else self.labels.tolist()
        return d
