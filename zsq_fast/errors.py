"""The exceptions zsq_fast raises for bad input. Catch ZsqFastError to catch them all.

Each one also derives from the built-in type the code raised before these existed (ValueError,
TypeError, OSError, FileNotFoundError), so `except ValueError` in existing callers keeps working.
Messages are one line and name the argument (or file, layer, tensor) at fault.

    ZsqFastError
    ├── InvalidArgumentError (ValueError)    an argument's value is wrong
    │   ├── ShapeMismatchError               the model cannot take these images: expected vs given shape
    │   ├── NonFiniteError                   NaN/inf in images, weights, activations or a result
    │   ├── UnsupportedModelError            the model has layers zsq_fast cannot handle
    │   └── FileFormatError                  a file is not what it should be: wrong kind, truncated, corrupted
    ├── InvalidTypeError (TypeError)         an argument has the wrong type
    └── PathError (OSError)                  a path cannot be read or written
        └── MissingFileError (FileNotFoundError)
"""
from __future__ import annotations


class ZsqFastError(Exception):
    """Base class of every error zsq_fast raises on purpose for bad input."""


class InvalidArgumentError(ZsqFastError, ValueError):
    """An argument's value is wrong (out of range, unknown name, empty, inconsistent with another)."""


class ShapeMismatchError(InvalidArgumentError):
    """The model cannot take a batch of this shape; the message gives the expected and the given shape."""


class NonFiniteError(InvalidArgumentError):
    """NaN or inf where finite numbers are needed; the message says how many and where."""


class UnsupportedModelError(InvalidArgumentError):
    """The model has a structure zsq_fast cannot quantize or generate for (the message names the layers)."""


class FileFormatError(InvalidArgumentError):
    """A file is not of the expected kind, or is truncated or corrupted (the message names the file)."""


class InvalidTypeError(ZsqFastError, TypeError):
    """An argument has the wrong type."""


class PathError(ZsqFastError, OSError):
    """A path cannot be read or written (a folder that is a file, no permission, a directory for a file)."""


class MissingFileError(PathError, FileNotFoundError):
    """An input file or folder does not exist."""


__all__ = ["ZsqFastError", "InvalidArgumentError", "ShapeMismatchError", "NonFiniteError",
           "UnsupportedModelError", "FileFormatError", "InvalidTypeError", "PathError", "MissingFileError"]
