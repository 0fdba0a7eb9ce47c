"""The CPU's data cache sizes, as Linux reports them (the kernels size their choices by
them: what stays cache-resident between uses)."""

from __future__ import annotations

import functools
from pathlib import Path

_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@functools.cache
def cache_bytes(level: int, default: int) -> int:
    """Bytes of one core's level-``level`` data (or unified) cache, or ``default`` where
    Linux does not say (no sysfs, another OS, an odd format)."""
    try:
        for index in sorted(_CACHES.glob("index*")):
            if (int((index / "level").read_text()) == level
                    and (index / "type").read_text().strip() != "Instruction"):
                text = (index / "size").read_text().strip()
                return int(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else int(text)
    except (OSError, ValueError, IndexError):
        pass
    return default
