"""bn_loss_of: the whole-set BN loss of any image set (synthetic, noise, real) for comparisons."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..ops import channel_stats
from .bn_capture import BNCapture, find_bn_layers
from .losses import bn_loss, layer_weights, std_from_var


@torch.no_grad()
def bn_loss_of(model: nn.Module, images: torch.Tensor, *, chunk_size: int = 128, lambda_sigma: float = 1.0,
               layer_weighting: str = "average", device=None) -> float:
    """L_BN (ALGORITHMS.md §1) with mu_hat, sigma_hat over all of `images` (normalized, N C H W)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise InvalidArgumentError("images must be a non-empty (N, C, H, W) tensor")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    layers = find_bn_layers(model)
    params = list(model.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    was_training = model.training
    model.eval()
    cap = BNCapture(layers)
    totals = None
    try:
        with cap:
            for i in range(0, images.shape[0], chunk_size):
                x = images[i:i + chunk_size].to(device, torch.float32)
                cap.clear()
                model(x)
                acts = [x] + [a if a is not None else x.new_empty(0, l.channels) for a, l in zip(cap.acts, layers)]
                s = [channel_stats(a) for a in acts]
                totals = s if totals is None else [t.merge(u) for t, u in zip(totals, s)]
    finally:
        model.train(was_training)
    keep = [0] + [1 + i for i, t in enumerate(totals[1:]) if t.count > 0]  # layers the forward used
    targets = [(torch.zeros(images.shape[1]), torch.ones(images.shape[1]))] + [(l.mean, l.std) for l in layers]
    stats = [(totals[i].mean.cpu(), std_from_var(totals[i].var.cpu())) for i in keep]
    return float(bn_loss(stats, [targets[i] for i in keep], layer_weights(len(keep), layer_weighting), lambda_sigma))
