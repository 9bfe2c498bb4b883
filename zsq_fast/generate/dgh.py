"""dgh: Data Generation for Hardware-friendly quantization (Dikstein et al., WACV 2025).

Whole-set aggregation of the BN statistics, in two modes:
- exact: pass 1 streams every chunk without autograd and merges per-channel sums (channel_stats);
  L_BN and dL/d(mu_bar, var_bar) are computed on the global statistics; pass 2 streams each chunk
  with autograd and injects that gradient at every BN input (inject_stats_grad), together with the
  per-image losses (ODSL). The result equals the gradient of the same loss on the full set.
- stale: one pass per step; a chunk's statistics are merged with the cached statistics of the
  other chunks from their last visit (what the public implementations do), taken from running totals
  (stale_cache.py: one un-merge per chunk and layer, O(chunks) per step). The chunk's cache entry
  is refreshed either from its finalised images after the update (the output view: smoothing, center
  crop, clip; stale_refresh="after_update", the DGH code's and MCT's behaviour, one extra forward
  without autograd per chunk) or from the forward the step already ran on this step's random view
  ("before_update": cheaper, the cache lags one update behind).
ODSL has per-image units fixed by a reference batch (losses.ODSL_REF_BATCH = 32, MCT DataGen's
default batch): every image adds w_odsl / 32 * L_out,i to the whole-set L_BN, whatever the chunk, so
a weight means what it means in MCT at batch 32 and the chunk size is a memory knob only. Exact mode
gives the same images for any chunk size and number of ranks (same device, threads and memory
layout): the whole-set statistics are merged in a fixed order (fixed_order.py), views and initial
noise are drawn per global image index, and every other term is per image.
Views (flip, smoothing, crop from a larger canvas, clip) are drawn once per step (views.py), so
both passes of an exact step see the same images.
"""
from __future__ import annotations

import torch

from ..ops import ChannelStats, channel_mean_var, channel_stats
from .context import Run, check_finite, forward, grad_of, output_images, see, update, whole_set_bn
from .losses import ODSL_REF_BATCH, bn_group_sums, bn_terms, layer_groups, merge_mean_var, odsl, std_from_var
from .shards import global_stats, reduce_sums
from .stale_cache import StaleCache
from .streaming import stream_of

STALE_REFRESH = ("after_update", "before_update")


def _odsl(run: Run, acts, logits) -> torch.Tensor:
    return odsl(logits, acts[-1], run.targets[-1], run.odsl_hinged)


def _step_losses(run: Run, bn: float, out_sum: float, groups: dict) -> dict:
    """The step's reported losses: L_BN, the mean per-image ODSL (when on), the objective
    L_BN + w_odsl / ODSL_REF_BATCH * sum_i L_out,i, and L_BN per layer group.
    out_sum: this rank's sum of L_out,i (summed over the ranks here)."""
    sums = reduce_sums({"out_sum": out_sum})
    losses = {"bn": bn, "total": bn + run.odsl_weight / ODSL_REF_BATCH * sums["out_sum"]}
    if run.odsl_weight:
        losses["odsl"] = sums["out_sum"] / run.n_all
    return {**losses, **groups}


def exact_gradients(run: Run, views, on_grad) -> dict:
    """One exact step's losses; on_grad(sl, x, grad, exp_avg, exp_avg_sq) receives each chunk's
    gradient of L = L_BN(global stats) + w_odsl / ODSL_REF_BATCH * sum_i L_out,i."""
    vsl = (lambda sl: None) if views is None else (lambda sl: views[sl])
    # pass 1: global statistics, no autograd
    bn = whole_set_bn(run, lambda sl, canvas: see(run, canvas, vsl(sl)), "the dgh BN loss", keep_last=True)
    # pass 2: each chunk with autograd; the exact dL/dx flows in at every BN input. Pass 1's last chunk
    # comes first, through the graph pass 1 kept (its moments are loaded; its images are pass 1's)
    kept, chunks = bn.kept, run.store.chunks(run.chunk_size)
    if kept is not None:
        chunks = [kept.sl] + [c for c in chunks if c != kept.sl]
    for sl, (x, m, v) in stream_of(run).chunks(chunks, moments=True):
        if kept is not None and sl == kept.sl:
            x, acts, logits = kept.x, kept.acts, kept.logits
            bn.kept = kept = None  # the graph is freed by its backward
        else:
            x.requires_grad_(True)
            acts, logits = forward(run, see(run, x, vsl(sl)))
        loss = bn.injected(acts)
        if run.odsl_weight:
            per = _odsl(run, acts, logits)
            check_finite(run, per.sum(), "the ODSL loss")
            loss = loss + run.odsl_weight / ODSL_REF_BATCH * per.sum()  # per image: no chunk-size dependence
            run.sums.add("out_sum", per.sum())  # on the device: read once, after the loop
        on_grad(sl, x.detach(), grad_of(run, loss, x), m, v)
    run.sums.add("bn", bn.loss)
    for k, val in bn_group_sums(bn.terms).items():
        run.sums.add(k, val)
    got = run.sums.read(run.step)  # the step's one host sync (raises for a failed finiteness check)
    return _step_losses(run, got["bn"], got.get("out_sum", 0.0), {k: got[k] for k in _group_names(run)})


def _group_names(run: Run) -> list[str]:
    return [f"bn_{name}" for name in layer_groups(len(run.targets))]


def exact_step(run: Run, views) -> dict:
    return exact_gradients(run, views, lambda sl, x, g, m, v: update(run, sl, x, g, m, v))


def init_stale_cache(run: Run, views) -> None:
    """Statistics of every chunk before the first stale step."""
    vsl = (lambda sl: None) if views is None else (lambda sl: views[sl])
    chunks = run.store.chunks(run.chunk_size)
    run.state["cache"] = StaleCache.from_chunks(
        (_chunk_stats(run, canvas, vsl(sl)) for sl, canvas in stream_of(run).chunks(chunks)), len(chunks))


def stale_gradients(run: Run, views, on_grad) -> dict:
    """One stale step: chunk j's loss is L_BN on (its fresh statistics merged with the cached
    statistics of the other chunks) + w_odsl / ODSL_REF_BATCH * sum_{i in j} L_out,i. on_grad(sl, ...) must leave the
    updated chunk in the store: with stale_refresh "after_update" its cache entry is then refreshed
    from the stored images' output view; with "before_update" from this step's forward."""
    cache: StaleCache = run.state["cache"]
    cache.resync()  # totals from scratch each step: rounding drift spans one step at most
    remote = _other_ranks(cache.totals)
    after = run.state.get("stale_refresh", "after_update") == "after_update"
    vsl = (lambda sl: None) if views is None else (lambda sl: views[sl])
    chunks = run.store.chunks(run.chunk_size)
    for j, (sl, (x, m, v)) in enumerate(stream_of(run).chunks(chunks, moments=True)):
        x.requires_grad_(True)
        acts, logits = forward(run, see(run, x, vsl(sl)))
        stats, fresh = [], []
        others = cache.others(j)
        seen = others if remote is None else [o.merge(r) for o, r in zip(others, remote)]
        for a, o in zip(acts, seen):
            mu_j, var_j = channel_mean_var(a)
            mu_j, var_j = mu_j.double(), var_j.double()
            n_j = float(a.numel() // a.shape[1])
            mu, var = (mu_j, var_j) if o.count == 0 else merge_mean_var(o.count, o.mean, o.var, n_j, mu_j, var_j)
            stats.append((mu, std_from_var(var)))
            fresh.append(ChannelStats(n_j, mu_j.detach(), var_j.detach() * n_j))
        terms = bn_terms(stats, run.targets, run.weights, run.lambda_sigma)
        loss = l_bn = sum(terms)
        if run.odsl_weight:
            per = _odsl(run, acts, logits)
            loss = loss + run.odsl_weight / ODSL_REF_BATCH * per.sum()
            run.sums.add("out_sum", per.sum())  # on the device: read once, after the loop
        check_finite(run, loss, "the dgh (stale) loss")
        g = grad_of(run, loss, x)
        run.sums.add("bn_sum", l_bn)
        for k, val in bn_group_sums(terms).items():
            run.sums.add(k, val)
        on_grad(sl, x.detach(), g, m, v)
        cache.replace(j, _finalised_stats(run, sl) if after else fresh, others)
    got = run.sums.read(run.step)  # the step's one host sync (raises for a failed finiteness check)
    group_sums = {k: got[k] for k in _group_names(run)}
    sums = reduce_sums({"bn_sum": got["bn_sum"], "chunks": len(chunks), **group_sums})
    groups = {k: sums[k] / sums["chunks"] for k in group_sums}
    return _step_losses(run, sums["bn_sum"] / sums["chunks"], got.get("out_sum", 0.0), groups)


def _other_ranks(local: list[ChannelStats]) -> list[ChannelStats] | None:
    """Per layer: the cached statistics of every other rank's chunks at the start of the step (None in
    a single process). Within a rank, chunk j sees the chunks before it refreshed this step, as in a
    single process; another rank's chunks it sees as they were when the step began."""
    from .stale_cache import unmerge

    whole = global_stats(local)
    return None if whole is local else [unmerge(w, t) for w, t in zip(whole, local)]


@torch.no_grad()
def _chunk_stats(run: Run, canvas: torch.Tensor, views) -> list[ChannelStats]:
    """Statistics of a chunk's canvases as the model sees them through `views`."""
    acts, _ = forward(run, see(run, canvas, views))
    return [channel_stats(a) for a in acts]


@torch.no_grad()
def _finalised_stats(run: Run, sl: slice) -> list[ChannelStats]:
    """Statistics of a chunk's stored images in their output view (what generate returns)."""
    acts, _ = forward(run, output_images(run, stream_of(run).load(sl)))  # after the chunk's write
    return [channel_stats(a) for a in acts]


def stale_step(run: Run, views) -> dict:
    return stale_gradients(run, views, lambda sl, x, g, m, v: update(run, sl, x, g, m, v))


def cache_state(run: Run) -> dict:
    cache = run.state.get("cache")
    return {} if cache is None else cache.state()


def restore_cache(run: Run, saved: dict) -> None:
    if saved:
        run.state["cache"] = StaleCache.from_state(saved, run.device)
