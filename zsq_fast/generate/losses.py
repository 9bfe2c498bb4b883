"""The losses, written like the papers' equations.

Statistics come as (mean, std) or (mean, var) per layer; layer 0 is the input image
(targets mean 0, std 1 per channel), layers 1.. are the BN inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ODSL's per-image units: each image adds odsl_weight / ODSL_REF_BATCH * L_out,i to the loss. 32 is MCT
# DataGen's default batch (DEFAULT_DATA_GEN_BS), so MCT's weight at its batch means the same here at any
# chunk size; a weight from a reference run at batch B translates to w * 32 / B.
ODSL_REF_BATCH = 32
STD_EPS = 1e-6  # inside the sqrt, as in the DGH paper code: sigma = sqrt(var + eps)


def std_from_var(var: torch.Tensor) -> torch.Tensor:
    return (var + STD_EPS).sqrt()


def layer_weights(n_layers: int, weighting: str) -> list[float]:
    """w_l over [input] + BN layers. 'average': 1/(#BN+1) each (MCT DataGen);
    'first_x10': the same with the first BN layer weighted x10 (MCT's first-layer multiplier)."""
    w = [1.0 / n_layers] * n_layers
    if weighting == "first_x10":
        w[1 if n_layers > 1 else 0] *= 10.0
    elif weighting != "average":
        raise ValueError(f"layer_weighting must be 'average' or 'first_x10', got {weighting!r}")
    return w


def bn_terms(stats, targets, weights, lambda_sigma: float) -> list[torch.Tensor]:
    """Per layer: w_l ( ||mu_hat_l - mu_l||^2 / C_l + lambda_sigma ||sigma_hat_l - sigma_l||^2 / C_l ).

    stats, targets: per layer (mean, std) vectors; computed in the dtype of stats."""
    terms = []
    for (mu_hat, sigma_hat), (mu, sigma), w in zip(stats, targets, weights):
        mu, sigma = mu.to(mu_hat), sigma.to(sigma_hat)
        terms.append(w * ((mu_hat - mu).square().mean() + lambda_sigma * (sigma_hat - sigma).square().mean()))
    return terms


def bn_loss(stats, targets, weights, lambda_sigma: float) -> torch.Tensor:
    """L_BN = sum_l w_l ( ||mu_hat_l - mu_l||^2 / C_l + lambda_sigma ||sigma_hat_l - sigma_l||^2 / C_l )."""
    return sum(bn_terms(stats, targets, weights, lambda_sigma), 0.0)


def layer_groups(n_layers: int) -> dict[str, range]:
    """Indices into [input] + BN layers for the reported BN loss per group: the input image, then
    the BN layers in thirds by depth (early / mid / late); empty groups are left out."""
    n_bn = n_layers - 1
    cuts = [1 + n_bn * k // 3 for k in range(4)]
    groups = {"input": range(0, 1), "early": range(cuts[0], cuts[1]), "mid": range(cuts[1], cuts[2]),
              "late": range(cuts[2], cuts[3])}
    return {name: r for name, r in groups.items() if len(r)}


def bn_group_losses(terms) -> dict[str, float]:
    """{"bn_input": ..., "bn_early": ..., ...}: the per-layer terms of L_BN summed per group."""
    return {f"bn_{name}": sum(float(terms[i].detach()) for i in r)
            for name, r in layer_groups(len(terms)).items()}


def bn_group_sums(terms) -> dict[str, torch.Tensor]:
    """bn_group_losses as float64 tensors on the terms' device (the loops read them once per step), summed in
    the same order, so the same values."""
    return {f"bn_{name}": sum(terms[i].detach().double() for i in r)
            for name, r in layer_groups(len(terms)).items()}


def odsl(logits: torch.Tensor, last_act: torch.Tensor | None = None, last_target=None,
         hinged: bool = False, margin: float = 0.5) -> torch.Tensor:
    """Output distribution stretching loss per image (N,):
        L_out,i = -(max_k z_ik - min_k z_ik)
    hinged form adds (||mu_i - mu_last||^2/C - 0.5)_+ + (||sigma_i - sigma_last||^2/C - 0.5)_+
    on the per-image statistics of the last BN input, so the stretch cannot wreck them."""
    z = logits.float().flatten(1)
    loss = -(z.amax(1) - z.amin(1))
    if hinged:
        a = last_act.float().reshape(last_act.shape[0], last_act.shape[1], -1)  # (N, C, spatial); BN1d: 1
        mu_i = a.mean(2)
        sigma_i = std_from_var(a.var(2, unbiased=False))
        mu, sigma = last_target
        loss = loss + F.relu((mu_i - mu.to(mu_i)).square().mean(1) - margin) \
                    + F.relu((sigma_i - sigma.to(sigma_i)).square().mean(1) - margin)
    return loss


def center_loss(stats, centers) -> torch.Tensor:
    """FDDA BNS alignment to class centers, per deep layer:
        sum_l ( ||mu_hat_l - c^mu_l||^2 / C_l + ||sigma_hat^2_l - c^{sigma^2}_l||^2 / C_l )
    stats, centers: per layer (mean, var). Used for L_C (exact centers) and L_D (noisy centers);
    fdda divides it by the number of deep layers (FDDA averages over them)."""
    total = 0.0
    for (mu_hat, var_hat), (c_mu, c_var) in zip(stats, centers):
        total = total + (mu_hat - c_mu.to(mu_hat)).square().mean() + (var_hat - c_var.to(var_hat)).square().mean()
    return total


def merge_mean_var(n_a: float, mean_a, var_a, n_b: float, mean_b, var_b):
    """Differentiable (mean, biased var) of the union of two sets (Chan et al.), for stale aggregation."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    var = (var_a * n_a + var_b * n_b + delta.square() * (n_a * n_b / n)) / n
    return mean, var
