"""The loss scaling benchmark runs and prints a row per term and batch (its numbers go in the README)."""

from __future__ import annotations

import subprocess
import sys

from jclip_testing import REPO_ROOT


def test_bench_prints_time_and_memory_for_every_term():
    result = subprocess.run(
        [sys.executable, "-m", "jclip.tools.loss_bench", "--batches=64,128", "--dim=16", "--prototypes=32", "--repeats=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line and line.split()[0] in
            ("clip", "siglip", "siglip_ring", "rankclip", "softclip", "nclip", "rank_sorts")]
    assert {row[0] for row in rows} >= {"clip", "siglip", "siglip_ring", "nclip", "rank_sorts"}
    for row in rows:
        assert int(row[1]) in (64, 128) and float(row[4]) > 0  # MiB per device
        assert row[3] != "-"  # small enough to run here
    clip_rows = [row for row in rows if row[0] == "clip"]
    assert all(row[5] == "1.00" for row in clip_rows)
