"""Files written so that a crash never leaves a half-written one behind: into a temporary file (or folder) beside
the target, then renamed over it. The data reach the disk (fsync) before the rename, and the rename itself does
(fsync of the folder) before the function returns: a node that loses power keeps the old file or the new one, never
an empty one."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import save_file


def _fsync(path) -> None:
    """Flushes a file's data, or a folder's entries (its renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file in the same folder, which is then renamed over `path`: a crash never
    leaves a half-written file behind, and a failed write leaves the old one untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _replace_atomically(path, write)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _replace_atomically(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def replace_folder_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a new folder beside `folder`, which then takes its place: readers see the old folder or the
    new one, never a partial one (between the two renames the old one is `.<name>.old`, complete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = folder.parent / f".{folder.name}.old"
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
            _fsync(path)
        _fsync(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


__all__ = ["atomic_save_safetensors", "atomic_write_bytes", "replace_folder_atomically"]
