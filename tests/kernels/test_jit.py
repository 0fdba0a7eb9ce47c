"""The compiled passes built with :func:`kernels.jit.compiled` (id checks, request
readers) compile once per machine, not once per process: a second process loads every one
from numba's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Calls every compiled pass once, then prints each dispatcher's cache hits and misses.
PROGRAM = """
import json
import numpy as np
from models import fastcheck
from service import jsonbags, kserve_features

fastcheck.valid_csr(np.zeros(3, np.int64), np.array([0, 1], np.int64), 10, False)
jsonbags.parse_bags(b'{"bags": [[1, 2], []]}')
kserve_features.warm_up(("a", "b"))
stats = {}
for module in (fastcheck, jsonbags, kserve_features):
    for name, value in vars(module).items():
        if hasattr(value, "stats") and hasattr(value, "signatures") and value.signatures:
            stats[f"{module.__name__}.{name}"] = [sum(value.stats.cache_hits.values()),
                                                 sum(value.stats.cache_misses.values())]
print(json.dumps(stats))
"""


def _run(cache: Path) -> dict[str, list[int]]:
    # Prepend, not replace: where packages come from PYTHONPATH (a carried site folder),
    # the child must still find them.
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_second_process_compiles_nothing(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert {"models.fastcheck._check", "service.jsonbags._parse",
            "service.kserve_features._read"} <= set(first)
    assert all(misses > 0 for _, misses in first.values()), first  # compiled and saved
    second = _run(tmp_path)
    # Helpers called only from compiled code come inside their callers' cached code.
    assert {"models.fastcheck._check", "service.jsonbags._parse",
            "service.kserve_features._read"} <= set(second) <= set(first)
    assert all(hits > 0 and misses == 0 for hits, misses in second.values()), second
