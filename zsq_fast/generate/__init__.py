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
