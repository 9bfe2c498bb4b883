"""AdaRound (Nagel et al. 2020) and the reconstruction loop it shares with BRECQ.

For one unit (a layer, or a block for BRECQ) with quantized layers l, minimise over the rounding
variables V_l
    || f_fp(x) - f_q(x_q) ||^2  +  lambda * sum_l sum (1 - |2 h(V_l) - 1|^beta)
with Adam, where f_q uses w_hat_l = s (clamp(floor(w/s) + h(V_l) + z) - z) from the fused op
zsq_fast.ops.adaround_quantize. The regularizer is off for the first 20 % of the iterations (warm-up);
then beta decays linearly from 20 to 2. At the end every weight is rounded by h = 1[V >= 0].
Optionally (BRECQ) the units' activation scales are learned with LSQ (their rate cosine-annealed to 0, as in
BRECQ's and QDrop's code), and QDrop keeps activations float element-wise with probability p.

Under a process group every rank draws the same global batch of indices (same seed) and computes the
loss on the part it holds, weighted by 1/B of the global batch; the gradients of V and of the activation
scales are summed over the ranks before each Adam step (one all-reduce), so every rank takes the step a
single process takes on the union of the shards, and the ranks' parameters stay identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..errors import InvalidArgumentError
from .cache import UnitData
from .calib_data import Layout
from .quantizer import qdrop_mask, qdrop_mix


# BRECQ's Adam rates for its 20000 iterations per unit: 1e-3 on V; activation scales (LSQ) as a relative step.
REFERENCE_ITERATIONS = 20000
REFERENCE_LR = 1e-3
REFERENCE_ACT_LR = 4e-4
MAX_RATE_FACTOR = 100.0
ACT_LR_SCHEDULES = ("cosine", "constant")


def default_rates(iterations: int) -> tuple[float, float]:
    """(lr on V, act_lr) for `iterations` per unit: BRECQ's rates times 20000 / iterations (at most 100x, never
    below BRECQ's). Adam moves each variable by about lr per step, so lr * iterations -- how far V and log2 s
    can travel -- stays what BRECQ's schedule allows: at 2000 iterations V gets 1e-2, enough to cross from a
    fractional part to a hard 0/1 (at 1e-3 it barely leaves its start), and an activation exponent can move
    (act_lr is cosine-annealed, as in BRECQ: its mean over the run is half of it, also as in BRECQ).
    benchmarks/recon_convergence.py measures it (RESULTS.md)."""
    factor = min(MAX_RATE_FACTOR, max(1.0, REFERENCE_ITERATIONS / iterations))
    return REFERENCE_LR * factor, REFERENCE_ACT_LR * factor


@dataclass
class ReconConfig:
    iterations: int = 20000       # per unit (BRECQ default)
    batch_size: int = 32
    lr: float = 1e-3              # Adam on V (quantize() picks default_rates(iterations) unless given)
    reg_weight: float = 0.01      # lambda (0.1 is BRECQ's choice for MobileNetV2)
    warmup: float = 0.2           # fraction of iterations without the regularizer
    beta_start: float = 20.0
    beta_end: float = 2.0
    learn_act_scale: bool = False  # LSQ on the unit's activation scales
    act_lr: float = 4e-4          # relative step per iteration of each activation scale (Quantizer.learning_rate)
    act_lr_schedule: str = "cosine"  # act_lr annealed to 0 over the iterations (BRECQ, QDrop); "constant"
    qdrop: float = 0.0            # QDrop probability (0 = off)

    def __post_init__(self):
        if self.act_lr_schedule not in ACT_LR_SCHEDULES:
            raise InvalidArgumentError(f"act_lr_schedule must be one of {ACT_LR_SCHEDULES}, "
                                       f"got {self.act_lr_schedule!r}")


def beta_schedule(t: int, total: int, cfg: ReconConfig) -> float | None:
    """beta at iteration t; None during the warm-up (no regularizer)."""
    warm = int(cfg.warmup * total)
    if t < warm:
        return None
    rel = (t - warm) / max(1, total - warm)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,): squared error summed over channels (dim 1), averaged over the positions of each sample. Its
    batch mean is BRECQ's reconstruction loss, which sets its balance against lambda * regularizer."""
    return (out - target).pow(2).sum(1).reshape(out.shape[0], -1).mean(1)


def _sum_over_ranks(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the params' gradients and the loss over the ranks (one flat all-reduce); returns the summed loss
    (a tensor: read only when reported, so a GPU is not synchronised every step)."""
    if not distributed.active():
        return loss.detach()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0])])
    flat = distributed.all_reduce_sum_(flat.to(distributed.collective_device()), "the reconstruction gradients")
    flat = flat.to(grads[0].device)
    at = 0
    for p, g in zip(params, grads):
        p.grad = flat[at:at + g.numel()].view_as(g).clone()
        at += g.numel()
    return flat[-1]


def reconstruct(unit: nn.Module, layers: list[nn.Module], data: UnitData, cfg: ReconConfig,
                generator: torch.Generator, on_step=None, site_quantizers=(), layout: Layout | None = None,
                output_quantizer=None, model_sites=(), tail: nn.Module | None = None,
                input_sites=()) -> float:
    """Learn the rounding of `layers` (inside `unit`) so that unit(x_q) matches the float target.

    Leaves every layer with hard rounding (h = 1[V >= 0]); returns the last reconstruction loss.
    on_step(t, loss_fn) is called each iteration (loss_fn() gives the loss as a float). site_quantizers: the
    output quantizers inside the unit (hw), learned with LSQ like the layers' input quantizers.
    layout: where data's images sit in the whole set across the ranks (None: a single process).
    output_quantizer: the network output's quantizer when this unit makes the logits: the loss is on the quantized
    logits, its scale held (output.py says why). model_sites: every site quantizer of the model; a layer reading
    a view of one (pool -> flatten -> fc) applies it again but learns it only when it is the unit's (in
    site_quantizers or input_sites): another unit's site is on its cached input's grid already (LSQ would see no
    error), and the recompute cache's prefix would run it learning.
    tail: the activation module fused into a layer unit, run on its output (its site quantizer, a forward hook,
    is among site_quantizers); data's targets are that activation's float output.
    input_sites: the quantizer of the site that is the unit's input, when the unit learns it (brecq.input_sites):
    data's inputs are unrounded, it rounds them on the way in (every reader inside the unit, a shortcut too, gets
    the rounded tensor, as in the model; a layer reading a view of it applies it again, a no-op on its grid) and is
    learned like site_quantizers. QDrop then drops that tensor in the quantizer, as it does inside a unit, instead
    of mixing in the float model's input.
    """
    layout = layout or Layout(data.n, 0, (data.n,))
    vs = [layer.init_adaround() for layer in layers]
    opt_v = torch.optim.Adam(vs, lr=cfg.lr)
    # a quantizer shared by layers reading one tensor is learned once
    # inputs that arrive quantized (a site outside the unit) are not the unit's to learn
    sites = {id(q) for q in model_sites}
    own = [layer.input_quantizer for layer in layers
           if not getattr(layer, "input_prequantized", False) and id(layer.input_quantizer) not in sites]
    act = list({id(q): q for q in [*own, *site_quantizers, *input_sites] if q.enabled}.values())
    opt_s = None
    params = list(vs)
    if cfg.learn_act_scale and act:
        # act_lr is a relative step (see Quantizer.learning_rate): the same schedule at 4 and at 16 bits
        groups = [{"params": [q.start_learning()], "lr": q.learning_rate(cfg.act_lr)} for q in act]
        params += [g["params"][0] for g in groups]
        opt_s = torch.optim.Adam(groups)
        # annealed to 0 as BRECQ and QDrop do: the scales settle (a pow2 exponent stops flipping at a boundary)
        sched_s = (torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=cfg.iterations, eta_min=0.0)
                   if cfg.act_lr_schedule == "cosine" else None)
    for q in act:
        q.drop_prob = cfg.qdrop
    last = float("nan")
    heart, t = distributed.Heartbeat("reconstruction"), 0  # names a rank that dies mid-reconstruction
    try:
        for t in range(cfg.iterations):
            heart.beat(t + 1)
            # the global batch (same on every rank); this rank computes the part it holds
            idx = torch.randint(0, layout.total, (min(cfg.batch_size, layout.total),), generator=generator)
            pos, local = layout.local(idx)
            weight = 1.0 / idx.numel()
            if pos.numel() == 0:  # none here: run one image at weight 0 so the QDrop draws stay in step
                pos, local, weight = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 0.0
            # this process holds the whole batch in order: masks drawn for x itself (the same draws, no gather)
            whole = pos.numel() == idx.numel() and torch.equal(pos, torch.arange(idx.numel()))
            rows = None if whole else (idx.numel(), pos)
            b = data.get(local)
            x = b["x_q"]
            if cfg.qdrop > 0 and not input_sites:  # QDrop on the unit's input: mix the quantized-prefix and float inputs
                x = qdrop_mix(qdrop_mask(x, cfg.qdrop, rows), b["x_fp"], x)
            for q in act:
                q.drop_rows = rows
                q.drop_memo = [] if cfg.qdrop > 0 else None
            for q in input_sites:
                x = q(x)
            beta = beta_schedule(t, cfg.iterations, cfg)
            for layer in layers:
                layer.beta = cfg.beta_start if beta is None else beta
            out = unit(x)
            if tail is not None:
                out = tail(out)
            if output_quantizer is not None:
                out = output_quantizer(out)
            rec = per_sample_loss(out, b["y_fp"]).sum() * weight  # this rank's share of the batch mean
            loss = rec
            if beta is not None and distributed.is_main():  # the same on every rank: added once
                loss = loss + cfg.reg_weight * sum(layer.reg for layer in layers)
            opt_v.zero_grad(set_to_none=True)
            if opt_s is not None:
                opt_s.zero_grad(set_to_none=True)
            loss.backward()
            rec_value = _sum_over_ranks(params, rec)
            opt_v.step()
            if opt_s is not None:
                opt_s.step()
                if sched_s is not None:
                    sched_s.step()
                for q in act:
                    if q.log2_scale is None:
                        q.scale.data.clamp_(min=1e-8)
            if on_step is not None:
                on_step(t, lambda v=rec_value: float(v))
            if t == cfg.iterations - 1:
                last = float(rec_value)
    except distributed.DistributedError as e:
        raise heart.failed("reconstruction iteration", t + 1, e) from e
    finally:
        for layer in layers:
            layer.rounding = "hard"
            layer.reg = None
            layer.v.requires_grad_(False)
        for q in act:
            q.drop_prob = 0.0
            q.drop_rows = None
            q.drop_memo = None
            if opt_s is not None:
                q.stop_learning()
    return last
