"""Hot swaps under load: a 1 GiB table swapped while 64 clients keep asking.

    python benchmarks/swap_under_load.py [--seconds 30] [--clients 64] [--swaps 10]

For one process and for ``--workers 2``: a real ``bagserve serve`` on a sum model over a
2,097,152 x 128 float32 table (1 GiB, .npy, memory-mapped), two versions that differ in
every value. Clients post one 8-id bag per request for ``--seconds``; meanwhile the
served file is replaced by rename (``v0.npy`` <-> ``v1.npy``) and ``POST
/v2/repository/models/m/load`` swaps it in, ``--swaps`` times; before the middle swap a
corrupt file is tried first (its load must fail and change nothing). Every answer is
checked against both versions. Prints the RELIABILITY.md section.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.conftest import start_server  # noqa: E402
from tests.integration.scenarios import pattern_table, swap_under_load  # noqa: E402

ROWS, DIM = 1 << 21, 128


def section(seconds: float = 30, clients: int = 64, swaps: int = 10) -> list[str]:
    """Run both modes; the RELIABILITY.md section's lines."""
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for version in (0, 1):
            pattern_table(folder / f"v{version}.npy", ROWS, DIM, version)
        (folder / "corrupt.npy").write_bytes(b"\x93NUMPY not a table")
        config = folder / "models.toml"
        config.write_text('[[models]]\nname = "m"\ncheckpoint = "table.npy"\nmode = "sum"\n')
        for workers in ("1", "2"):
            target = folder / "table.npy"
            target.unlink(missing_ok=True)
            os.link(folder / "v0.npy", target)
            server = start_server(folder, "--config", str(config), "--workers", workers)
            started = time.monotonic()
            try:
                seen = swap_under_load(server, folder, rows=ROWS, dim=DIM, seconds=seconds,
                                       clients=clients, swaps=swaps, corrupt_at=swaps // 2)
            finally:
                code = server.stop()
            elapsed = time.monotonic() - started
            answered = sum(seen.statuses.values())
            good = [status for status, source in seen.swaps if source != "corrupt"]
            corrupt = [status for status, source in seen.swaps if source == "corrupt"]
            versions = sorted(seen.versions, key=int)
            rows.append(
                f"| {workers} | {answered:,} ({answered / elapsed:,.0f}/s) | "
                f"{answered - seen.statuses['200']} | {seen.matched['wrong']} | "
                f"{seen.matched['0']:,} / {seen.matched['1']:,} | "
                f"{good.count(200)} of {len(good)} | {', '.join(map(str, corrupt))} | "
                f"{len(versions)} ({versions[0]}-{versions[-1]}) | "
                f"{seen.rss_before_mib:,.0f} | {seen.rss_after_mib:,.0f} "
                f"({100 * (seen.rss_after_mib / seen.rss_before_mib - 1):+.1f}%) | {code} |")
    return [
        f"## Hot swaps under load: {clients} clients, {seconds:g} s, a 1 GiB table swapped "
        f"{swaps} times", "",
        f"`python benchmarks/swap_under_load.py` ({os.cpu_count()} cores). Model `m`: sum "
        f"over a {ROWS:,} x {DIM} float32 .npy (memory-mapped); versions v0/v1 differ in "
        "every value; one 8-id bag per request; the file replaced by rename, then `POST "
        "/v2/repository/models/m/load`; a corrupt file tried before the middle swap (with "
        "workers, its failed load still uses up a version number). RSS: the server's "
        "processes summed (shared file pages count once per worker), before the first swap "
        "and 2 s after the last.", "",
        "| workers | answered | non-200 | wrong (neither version) | v0 / v1 answers | swaps "
        "answered 200 | corrupt swap answered | versions seen | RSS before, MiB | RSS after, "
        "MiB | exit code |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()
    print("\n".join(section(args.seconds, args.clients, args.swaps)))


if __name__ == "__main__":
    main()
