"""Synthetic calibration images from a model's BatchNorm statistics (bns, dgh, fdda).

    images, record = zsq_fast.generate(model, 256, method="dgh", image_size=32)
    zsq_fast.save_images(images, "out.pt"); images = zsq_fast.load_images("out.pt")
"""
from .api import generate
from .context import NonFiniteLossError
from .io import IMAGENET_MEAN, IMAGENET_STD, load_images, save_images
from .measure import bn_loss_of
from .record import GenerationRecord

__all__ = ["generate", "save_images", "load_images", "GenerationRecord", "NonFiniteLossError",
           "bn_loss_of", "IMAGENET_MEAN", "IMAGENET_STD"]


# Importing this subpackage binds the attribute zsq_fast.generate to the *module*, shadowing the
# lazy `zsq_fast.generate` function of zsq_fast/__init__.py. A callable module keeps
# `zsq_fast.generate(model, ...)` working either way.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
