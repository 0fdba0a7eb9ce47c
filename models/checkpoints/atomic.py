"""Atomic file writes: readers never see a half-written checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, chunks: Iterable[Any]) -> None:
    """Write the byte-like ``chunks`` to a temporary file beside ``path``, then rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
