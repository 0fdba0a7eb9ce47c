"""Atomic file writes: readers never see a half-written checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, chunks: Iterable[Any]) -> None:
    """Write the byte-like ``chunks`` to a temporary file beside ``path``, then rename.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600: a
    container running as another user must be able to read a mounted checkpoint."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
