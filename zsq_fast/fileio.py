"""Writing outputs atomically and reading torch files with clear errors.

write_atomic writes to a temporary name in the destination folder and renames it onto the target,
so a failure (disk full, a bad argument found while writing, Ctrl-C) never leaves a partial file.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import FileFormatError, InvalidTypeError, MissingFileError, PathError


def as_path(path, what: str) -> Path:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise InvalidTypeError(f"{what} must be a non-empty str or os.PathLike path, got {path!r:.80}")
    return Path(path)


def _parent_ready(path: Path, what: str) -> None:
    if path.is_dir():
        raise PathError(f"{what} {str(path)!r} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{what} {str(path)!r}: cannot create its folder ({type(e).__name__}: {e.strerror or e})") \
            from None


def write_atomic(path, write: Callable[[Path], None], what: str) -> Path:
    """write(tmp) fills a temporary file beside `path`, which is then renamed onto `path`."""
    path = as_path(path, what)
    _parent_ready(path, what)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:  # created here, so an unwritable folder fails before any work (and with the usual umask mode)
        with open(tmp, "xb"):
            pass
    except OSError as e:
        raise PathError(f"{what} {str(path)!r} is not writable ({type(e).__name__}: {e.strerror or e})") from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise PathError(f"cannot write {what} {str(path)!r} ({type(e).__name__}: {e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_folder_atomic(path, write: Callable[[Path], None], what: str) -> Path:
    """write(tmp_dir) fills a temporary folder beside `path`; its files then move into `path` (created
    when missing, by one rename). On failure the temporary folder is removed and `path` is untouched."""
    path = as_path(path, what)
    if path.exists() and not path.is_dir():
        raise PathError(f"{what} {str(path)!r} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.mkdir()  # the usual umask mode (mkdtemp would make it 0700)
    except OSError as e:
        raise PathError(f"{what} {str(path)!r} is not writable ({type(e).__name__}: {e.strerror or e})") from None
    try:
        write(tmp)
        if not path.exists():
            os.replace(tmp, path)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, path / f.name)
    except OSError as e:
        raise PathError(f"cannot write {what} {str(path)!r} ({type(e).__name__}: {e.strerror or e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_torch_file(path, what: str, map_location="cpu"):
    """torch.load(weights_only=True) whose failures name the file and what it should have been."""
    path = as_path(path, what)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {str(path)!r}")
    if path.is_dir():
        raise PathError(f"{what} {str(path)!r} is a directory, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise PathError(f"cannot read {what} {str(path)!r} ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling/zip errors (an OSError on a cut zip too): not a torch file
        raise FileFormatError(f"{str(path)!r} is not a {what} (truncated, corrupted or another kind of file; "
                              f"torch.load: {type(e).__name__})") from None
