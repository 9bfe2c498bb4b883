"""Built-in model zoo and model loading."""
from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet44, resnet56
from .digits_cnn import DigitsCNN, digits_cnn
from .zoo import ZOO, LoadedModel, load_model

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet44", "resnet56",
           "DigitsCNN", "digits_cnn", "ZOO", "LoadedModel", "load_model"]
