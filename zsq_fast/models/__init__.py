"""Built-in model zoo."""
from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet44, resnet56

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet44", "resnet56"]
