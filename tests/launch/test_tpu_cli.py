"""launch/tpu.py's command line and its pure parts: flag checks (exit 2), the runner, setup reports, verdicts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from launch_testing import REPO, git_tree, run_tpu

sys.path.insert(0, str(REPO / "launch"))
import tpu  # noqa: E402

TARGET = ["--name=tpu-a", "--zone=us-east5-b"]


@pytest.mark.parametrize("command", ["", "create", "setup", "run", "stop", "delete", "logs", "status", "babysit"])
def test_every_command_has_help(command: str) -> None:
    done = run_tpu([command, "--help"] if command else ["--help"])
    assert done.returncode == 0 and "usage: launch/tpu.py" in done.stdout
    if command:
        assert "--dry-run" in done.stdout


@pytest.mark.parametrize("text,expected", [
    ("v6e-8", ("v6e-8", "v2-alpha-tpuv6e")),
    ("v5litepod-16", ("v5litepod-16", "v2-alpha-tpuv5-lite")),
    ("v5e-16", ("v5litepod-16", "v2-alpha-tpuv5-lite")),
    ("v5p-64", ("v5p-64", "v2-alpha-tpuv5")),
    ("v4-32", ("v4-32", "tpu-ubuntu2204-base")),
])
def test_accelerators_and_their_default_runtimes(text: str, expected: tuple[str, str]) -> None:
    assert tpu.accelerator(text) == expected


@pytest.mark.parametrize("args,message", [
    (["--accelerator=v3-8"], "unknown TPU generation 'v3' in 'v3-8': use one of v4, v5e (v5litepod), v5p, v6e"),
    (["--accelerator=v6e"], "malformed accelerator 'v6e': expected GENERATION-SIZE"),
    (["--accelerator=v6e-0"], "malformed accelerator 'v6e-0'"),
    (["--accelerator=v6e-8", "--direct", "--slices=2"], "--slices above 1 needs a queued resource"),
    (["--accelerator=v6e-8", "--capacity=cheap"], "invalid choice: 'cheap'"),
    (["--accelerator=v6e-8", "--name=Bad_Name"], "invalid TPU name 'Bad_Name'"),
])
def test_create_rejects_bad_flags_with_exit_2(args: list[str], message: str) -> None:
    done = run_tpu(["create", *TARGET, "--dry-run", *args])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "+ gcloud" not in done.stdout


@pytest.mark.parametrize("args,message", [
    (["run", *TARGET, "--workdir=gs://b/r", "--env=1A=x", "--", "--config=c"],
     "--env wants KEY=VALUE with KEY a variable name"),
    (["run", *TARGET, "--workdir=gs://b/r", "--env=A", "--", "--config=c"], "--env wants KEY=VALUE"),
    (["run", *TARGET, "--workdir=gs://b/r"], "give jclip.main's flags after --"),
    (["run", *TARGET, "--", "--config=c"], "the following arguments are required: --workdir"),
    (["stop", *TARGET, "--", "--config=c"], "stop takes no arguments after --"),
    (["logs", *TARGET, "--worker=first"], "invalid worker 'first'"),
    (["run", *TARGET, "--run-name=a/b", "--workdir=gs://b/r", "--", "-c"], "invalid run name 'a/b'"),
    (["create", "--zone=z", "--accelerator=v6e-8"], "the following arguments are required: --name"),
])
def test_other_bad_flags_exit_2(args: list[str], message: str) -> None:
    done = run_tpu([args[0], "--dry-run", *args[1:]])
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_local_workdir_is_allowed_with_a_warning() -> None:
    done = run_tpu(["run", *TARGET, "--dry-run", "--workdir=/tmp/run", "--", "--config=c"])
    assert done.returncode == 0
    assert "warning: --workdir=/tmp/run is not gs://" in done.stderr


def test_setup_needs_the_worker_scripts_in_the_tree(tmp_path: Path) -> None:
    tree = git_tree(tmp_path / "tree", {"setup.py": "\n"})
    done = run_tpu(["setup", *TARGET, "--dry-run"], cwd=tree)
    assert done.returncode == 1
    assert "launch/tpu_worker.sh, launch/tpu_setup_worker.sh not in the files git lists here" in done.stderr
    done = run_tpu(["setup", *TARGET, "--dry-run", "--commit=HEAD"], cwd=tree)
    assert done.returncode == 1 and "it predates this launcher" in done.stderr


def test_the_runner_prints_quoted_commands_and_fails_with_their_status(capsys) -> None:
    tpu.Runner(dry_run=True).run(["touch", "/nonexistent/a b", "$x;y"])
    assert capsys.readouterr().out == "+ touch '/nonexistent/a b' '$x;y'\n"
    with pytest.raises(tpu.CommandFailed) as failed:
        tpu.Runner(dry_run=False).run(["sh", "-c", "exit 7"])
    assert failed.value.returncode == 7
    with pytest.raises(tpu.CommandFailed) as missing:
        tpu.Runner(dry_run=False).run(["no-such-program-here"])
    assert missing.value.returncode == 127


def test_the_default_jax_version_is_the_local_one() -> None:
    from importlib import metadata

    try:
        expected = metadata.version("jax")
    except metadata.PackageNotFoundError:
        expected = tpu.FALLBACK_JAX_VERSION
    args = tpu.build_parser().parse_args(["setup", *TARGET])
    assert args.jax_version == expected


REPORT = "jclip-versions: host=h{0} worker={0} python=3.11.2 jax=0.10.2 jaxlib=0.10.2 libtpu=0.0.42 source=abc"


def test_setup_reports_that_agree_pass_and_a_mismatch_fails(capsys) -> None:
    tpu.check_setup_reports("\n".join(REPORT.format(index) for index in range(4)), "abc")
    assert "setup: 4 workers with python=3.11.2 jax=0.10.2" in capsys.readouterr().out
    mixed = REPORT.format(0) + "\n" + REPORT.format(1).replace("jaxlib=0.10.2", "jaxlib=0.10.1")
    with pytest.raises(tpu.LaunchError, match="the workers disagree"):
        tpu.check_setup_reports(mixed, "abc")
    with pytest.raises(tpu.LaunchError, match="not def"):
        tpu.check_setup_reports(REPORT.format(0), "def")
    with pytest.raises(tpu.LaunchError, match="no worker reported"):
        tpu.check_setup_reports("", "abc")


@pytest.mark.parametrize("states,verdict", [
    (["finished rc=0", "finished rc=0"], "finished"),
    (["finished rc=0", "running"], "running"),
    (["running", "starting"], "running"),
    (["running", "failed rc=1"], "failed"),
    (["failed rc=5", "failed rc=1"], "stopped"),
    (["failed rc=2", "running"], "stopped"),
    (["failed rc=4", "running"], "failed"),
    (["signalled rc=143", "running"], "failed"),
    (["lost (was running)", "running"], "failed"),
    (["none", "none"], "none"),
    ([], "unknown"),
])
def test_verdict(states: list[str], verdict: str) -> None:
    assert tpu.verdict(states) == verdict


def test_split_jclip_args_at_the_first_double_dash() -> None:
    assert tpu.split_jclip_args(["run", "--name=a", "--", "--x", "--", "y"]) == (["run", "--name=a"], ["--x", "--", "y"])
    assert tpu.split_jclip_args(["stop"]) == (["stop"], [])


def test_env_pair_and_accelerator_raise_argparse_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        tpu.env_pair("A-B=1")
    assert tpu.env_pair("A_B=x=y z") == "A_B=x=y z"
