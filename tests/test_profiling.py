"""config.profile_steps: the FIRST,LAST spec, its checks, and a real run's trace of exactly those steps."""

from __future__ import annotations

import gzip
import json

import pytest

from jclip.errors import ConfigError
from jclip.profiling import parse_profile_steps
from jclip_testing import micro_run_flags, run_jclip_main


@pytest.mark.parametrize("spec, expected", [("", None), (None, None), ("10,20", (10, 20)), (" 3 , 3 ", (3, 3)),
                                            ("7", (7, 7))])
def test_specs_that_parse(spec, expected):
    assert parse_profile_steps(spec, total_steps=20) == expected


@pytest.mark.parametrize("spec", ["0,3", "5,4", "3,21", "a,b", "1,2,3", "1;2"])
def test_specs_that_are_config_errors(spec):
    with pytest.raises(ConfigError, match="profile_steps"):
        parse_profile_steps(spec, total_steps=20)


def test_a_run_traces_the_chosen_steps_into_the_workdir(tmp_path, scenes_data_dir):
    workdir = tmp_path / "run"
    output = run_jclip_main(workdir, "configs/clip.py",
                            micro_run_flags(scenes_data_dir, total_steps=5, checkpoint_every=5)
                            + ["--config.profile_steps=3,4"])
    assert "profile of steps 3-4 written to" in output
    perfetto = list((workdir / "profile").rglob("perfetto_trace.json.gz"))
    xplane = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(perfetto) == 1 and len(xplane) == 1, sorted(p.name for p in (workdir / "profile").rglob("*"))
    events = json.load(gzip.open(perfetto[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("ph") == "X" and e.get("name") == "PjitFunction(train_step)")
    separate = [start for index, (start, _) in enumerate(calls) if index == 0 or start > calls[index - 1][1]]
    assert len(separate) == 2, calls  # steps 3 and 4 (the host's calls, nested events merged); not 1, 2 or 5
