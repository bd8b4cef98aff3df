"""`python -m jclip.tools.compare`: every (method, seed) trained, and the table's mean ± std equal to NumPy's over the
runs' own final metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jclip_testing import REPO_ROOT, micro_run_flags


@pytest.mark.slow
def test_compare_trains_each_method_and_seed_and_tabulates(tmp_path, scenes_data_dir):
    flags = micro_run_flags(scenes_data_dir, total_steps=2, checkpoint_every=2)
    command = [sys.executable, "-m", "jclip.tools.compare", f"--workdir={tmp_path}", "--methods=clip,siglip",
               "--seeds=0,1", "--", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for method in ("clip", "siglip"):
        runs = [json.loads(l) for seed in (0, 1) for l in (tmp_path / method / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert runs, method
    # The two seeds differ (initialisation and data order), so the std is not zero.
    finals = []
    for seed in (0, 1):
        values = {}
        for line in (tmp_path / "clip" / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines():
            values.update(json.loads(line))
        finals.append(values["eval/zeroshot/top1"])
    expected = f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}"
    table = (tmp_path / "comparison.md").read_text()
    clip_row = next(line for line in table.splitlines() if line.startswith("| clip |"))
    assert clip_row.split(" | ")[4] == expected
    assert finals[0] != finals[1]
    assert json.loads((tmp_path / "comparison.json").read_text())["runs"]["siglip"]["1"]


def test_a_method_may_carry_one_config_arg_joined_with_the_shared_ones():
    from jclip.tools import compare

    flag = compare.config_flag("fscclip:variant=negclip", "init=/w/pre,negatives=/w/neg")
    assert flag == f"--config={compare.CONFIGS_DIR / 'fscclip.py'}:variant=negclip,init=/w/pre,negatives=/w/neg"
    assert compare.config_flag("clip", "") == f"--config={compare.CONFIGS_DIR / 'clip.py'}"
    assert compare.config_flag("clip", "steps=5") == f"--config={compare.CONFIGS_DIR / 'clip.py'}:steps=5"
    assert compare.run_dir("fscclip:variant=negclip") == "fscclip-variant-negclip"
