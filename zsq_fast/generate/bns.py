"""bns: per-batch BN-statistics matching (ZeroQ / DeepInversion), the baseline.

Each chunk is a batch with its own loss L_BN(mu_hat_batch, sigma_hat_batch); its images get the
gradient of that loss only.
"""
from __future__ import annotations

from ..ops import channel_mean_var
from .context import Run, check_finite, forward, grad_of, see, update
from .losses import ODSL_REF_BATCH, bn_group_sums, bn_terms, layer_groups, odsl, std_from_var
from .shards import reduce_sums
from .streaming import stream_of


def bns_step(run: Run, views) -> dict:
    for sl, (x, m, v) in stream_of(run).chunks(run.store.chunks(run.chunk_size), moments=True):
        x.requires_grad_(True)
        acts, logits = forward(run, see(run, x, None if views is None else views[sl]))
        stats = []
        for a in acts:
            mu, var = channel_mean_var(a)
            stats.append((mu, std_from_var(var)))
        terms = bn_terms(stats, run.targets, run.weights, run.lambda_sigma)
        loss = l_bn = sum(terms)
        if run.odsl_weight:
            per = odsl(logits, acts[-1], run.targets[-1], run.odsl_hinged)
            loss = loss + run.odsl_weight / ODSL_REF_BATCH * per.sum()  # per-image units, as dgh
            run.sums.add("out_sum", per.sum())  # on the device: read once, after the loop
        check_finite(run, loss, "the bns loss")
        update(run, sl, x.detach(), grad_of(run, loss, x), m, v)
        run.sums.add("bn_sum", l_bn, sl.stop - sl.start)
        for k, val in bn_group_sums(terms).items():
            run.sums.add(k, val, sl.stop - sl.start)
    got = run.sums.read(run.step)  # the step's one host sync (raises for a failed finiteness check)
    group_sums = {f"bn_{name}": got[f"bn_{name}"] for name in layer_groups(len(run.targets))}
    sums = reduce_sums({"bn_sum": got["bn_sum"], "out_sum": got.get("out_sum", 0.0), **group_sums})  # over the ranks
    n_total, bn_sum, out_sum = run.n_all, sums["bn_sum"], sums["out_sum"]
    group_sums = {k: sums[k] for k in group_sums}
    bn = bn_sum / n_total
    # the objective's ODSL term per image, scaled to a batch of the reference size
    losses = {"bn": bn, "total": bn + run.odsl_weight * out_sum / n_total}
    if run.odsl_weight:
        losses["odsl"] = out_sum / n_total
    return {**losses, **{k: val / n_total for k, val in group_sums.items()}}
