"""`timm:<name>` models: architecture by timm name (a pretrained tag too: `resnet18.a1_in1k`), input
convention from the model's own data config, weights from a state dict or the local timm / Hugging Face cache.

Nothing here downloads: `pretrained` weights are loaded only when the file is already in the Hugging Face hub
cache (HF_HUB_CACHE / HF_HOME) or, for weights timm fetches by URL, in the torch hub cache; otherwise the error
says how to put it there.
"""
from __future__ import annotations

import difflib
import os

from torch import nn

from ..errors import InvalidArgumentError

PRETRAINED = ("pretrained",)  # --weights values that mean "timm's pretrained weights, from the local cache"


def require_timm():
    try:
        import timm
    except ImportError:
        raise InvalidArgumentError("timm:<name> models need timm: pip install timm") from None
    return timm


def check_name(name: str) -> None:
    """One error for a name timm does not know, with the close names it does."""
    timm = require_timm()
    if name and timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = timm.list_models(f"*{arch}*")[:6] if arch else []
    if not close:
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else "; timm.list_models('*pattern*') lists them"
    raise InvalidArgumentError(f"timm has no model {name!r}{hint}")


def cached_weights(cfg: dict) -> str | None:
    """The local file timm's pretrained weights for this pretrained_cfg would load, or None if not cached."""
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for fname in names:
            found = try_to_load_from_cache(repo, fname, revision=revision or None)
            if isinstance(found, str):  # a path; None or a 'known missing' sentinel otherwise
                return found
    url = cfg.get("url")
    if url:
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        if os.path.isfile(path):
            return path
    return None


def _not_cached(name: str, cfg: dict) -> InvalidArgumentError:
    from huggingface_hub import constants

    where = (f"Hugging Face cache {constants.HF_HUB_CACHE} (repo {cfg['hf_hub_id']})" if cfg.get("hf_hub_id")
             else "torch hub cache" if cfg.get("url") else None)
    if where is None:
        return InvalidArgumentError(f"timm has no pretrained weights for {name}; pass --weights FILE (a state dict)")
    return InvalidArgumentError(
        f"pretrained weights of timm:{name} are not in the local {where}; zsq_fast never downloads them: fetch "
        f"them once where there is network (python -c \"import timm; timm.create_model('{name}', "
        f"pretrained=True)\") or pass --weights FILE (a state dict)")


def create(name: str, weights: str | None, model_kwargs: dict | None = None) -> tuple[nn.Module, dict, dict]:
    """(model, data config, info). weights: None / 'none' (random init), 'pretrained' (local cache) or a
    state-dict file (loaded by the caller, strict)."""
    timm = require_timm()
    check_name(name)
    kwargs = dict(model_kwargs or {})
    info = {"weights": "random init"}
    try:
        if weights is not None and weights.lower() in PRETRAINED:
            cfg = timm.models.get_pretrained_cfg(name)
            cfg = cfg.to_dict() if cfg is not None else {}
            path = cached_weights(cfg)
            if path is None:
                raise _not_cached(name, cfg)
            # the cached file as the source: timm applies its key filters and classifier handling, no network
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
            info["weights"] = f"timm pretrained ({path})"
        else:
            model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:  # an unknown model keyword reaches the model's __init__
        raise InvalidArgumentError(f"timm:{name} does not take {sorted(kwargs)} ({e})") from None
    # the eval-time size and crop of the pretrained config (timm's validate.py does the same)
    data_cfg = timm.data.resolve_model_data_config(model, use_test_size=True)
    return model, data_cfg, info
