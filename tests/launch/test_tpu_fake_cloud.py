"""launch/tpu.py against a fake gcloud (tests/launch/fake_gcloud.py): it runs the real worker scripts with bash
in one folder per worker (2 workers a node), and the stub python of tests/launch/stub_python.py trains nothing."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from launch_testing import REPO, FakeCloud, wait_for

sys.path.insert(0, str(REPO / "launch"))
import tpu  # noqa: E402

TARGET = ["--name=tpu-a", "--zone=us-east5-b", "--project=p"]
NASTY = ["--config=configs/clip.py:model=B/32", "--config.name=a b 'c' \"d\" $HOME ; echo pwned", "", "--x=$(id)"]


def create_and_setup(cloud: FakeCloud, *extra: str) -> None:
    created = cloud.tpu("create", *TARGET, *extra, "--accelerator=v6e-8", "--wait", "--poll-seconds=0.01")
    assert created.returncode == 0, created.stderr
    done = cloud.tpu("setup", *TARGET, *[flag for flag in extra if flag.startswith("--slices")],
                     "--jax-version=0.10.2", f"--python={cloud.python}")
    assert done.returncode == 0, done.stdout + done.stderr


def finished(cloud: FakeCloud, nodes: list[str]) -> bool:
    return all(cloud.stub_runs(node, worker) for node in nodes for worker in (0, 1))


def test_create_waits_until_the_queued_resource_is_active(fake_cloud: FakeCloud) -> None:
    done = fake_cloud.tpu("create", *TARGET, "--accelerator=v6e-8", "--wait", "--poll-seconds=0.01")
    assert done.returncode == 0, done.stderr
    assert fake_cloud.steps() == ["create", "describe", "describe", "describe"]
    assert "tpu-a is WAITING_FOR_RESOURCES" in done.stdout and "tpu-a is PROVISIONING" in done.stdout


def test_create_fails_clearly_when_the_queued_resource_fails(fake_cloud: FakeCloud) -> None:
    done = fake_cloud.tpu("create", *TARGET, "--accelerator=v6e-8", "--wait", "--poll-seconds=0.01",
                          env={"FAKE_GCLOUD_FAIL": "1"})
    assert done.returncode == 1
    assert "tpu-a is FAILED while waiting for ACTIVE" in done.stderr


def test_a_failing_gcloud_call_stops_with_its_exit_status(fake_cloud: FakeCloud) -> None:
    done = fake_cloud.tpu("run", *TARGET, "--workdir=gs://b/r", "--", "--config=x")
    assert done.returncode == 255
    assert "exit status 255 from: gcloud compute tpus tpu-vm ssh tpu-a" in done.stderr


@pytest.mark.parametrize("slices", [1, 2])
def test_setup_ships_the_working_tree_and_builds_the_venv_once(fake_cloud: FakeCloud, slices: int) -> None:
    create_and_setup(fake_cloud, f"--slices={slices}")
    nodes = ["tpu-a"] if slices == 1 else ["tpu-a-0", "tpu-a-1"]
    digests = set()
    for node in nodes:
        for worker in (0, 1):
            home = fake_cloud.home(node, worker)
            source = (home / "jclip").resolve()
            assert source.parent == home / "jclip-src"
            digests.add(source.name)
            shipped = sorted(str(path.relative_to(source)) for path in source.rglob("*") if path.is_file())
            assert shipped == [".gitignore", "launch/tpu_setup_worker.sh", "launch/tpu_worker.sh", "notes.txt", "setup.py"]
            assert os.access(source / "launch" / "tpu_worker.sh", os.X_OK)
            pip_log = (home / "jclip-venv" / "pip.log").read_text().splitlines()
            assert pip_log == ['["install", "-q", "jax[tpu]==0.10.2"]', f'["install", "-q", "-e", "{source}"]']
            assert not list(home.glob("*.tar.gz"))
    assert len(digests) == 1
    again = fake_cloud.tpu("setup", *TARGET, f"--slices={slices}", "--jax-version=0.10.2", f"--python={fake_cloud.python}")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("jax 0.10.2 is already in") == 2 * len(nodes)
    assert f"setup: {2 * len(nodes)} workers with python=" in again.stdout
    assert "jax=0.10.2 jaxlib=0.10.2 libtpu=0.0.42 source=" + digests.pop() in again.stdout


def test_setup_of_a_commit_ships_that_commit(fake_cloud: FakeCloud) -> None:
    fake_cloud.tpu("create", *TARGET, "--direct", "--accelerator=v6e-8")
    (fake_cloud.source / "setup.py").write_text("# edited after the commit\n")
    done = fake_cloud.tpu("setup", *TARGET, "--commit=HEAD", "--jax-version=0.10.2", f"--python={fake_cloud.python}")
    assert done.returncode == 0, done.stderr
    source = (fake_cloud.home("tpu-a", 1) / "jclip").resolve()
    assert (source / "setup.py").read_text() == "# stand-in for jclip's setup.py\n"
    assert not (source / "notes.txt").exists()


def test_run_round_trips_arguments_through_gcloud_and_the_workers_shell(fake_cloud: FakeCloud) -> None:
    create_and_setup(fake_cloud)
    done = fake_cloud.tpu("run", *TARGET, "--workdir=gs://bucket/run 1", "--env=NOTE=it's $5; ok", "--", *NASTY)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: finished(fake_cloud, ["tpu-a"]), what="both workers' runs")
    for worker in (0, 1):
        [record] = fake_cloud.stub_runs("tpu-a", worker)
        assert record["argv"] == ["--workdir=gs://bucket/run 1", *NASTY]
        assert record["env"]["NOTE"] == "it's $5; ok"
        assert record["env"]["JCLIP_DISTRIBUTED"] == "on"
    status = wait_for(lambda: (lambda out: out.count("state=finished rc=0") == 2 and out)(
        fake_cloud.tpu("status", *TARGET).stdout), what="the finished state")
    assert "tpu-a: ACTIVE" in status
    logs = fake_cloud.tpu("logs", *TARGET, "--worker=1", "--lines=3")
    assert "worker-1.log" in logs.stdout and "worker-0.log" not in logs.stdout


def test_the_built_run_command_round_trips_through_bash() -> None:
    args = tpu.build_parser().parse_args(["run", *TARGET, "--workdir=gs://b/r", "--env=A=x y"])
    command = tpu.run_command(args, NASTY)
    # bash -c with `bash` replaced by a dump of argv: exactly what the worker's login shell would hand over.
    dump = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    out = subprocess.run(["bash", "-c", command.replace("bash ", dump + " ", 1)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [f"{os.environ.get('HOME')}/jclip/launch/tpu_worker.sh", "start", "--run-name",
                                      "jclip", "--env", "A=x y", "--", "--workdir=gs://b/r", *NASTY]


def test_stop_sends_sigterm_and_waits_for_python(fake_cloud: FakeCloud) -> None:
    create_and_setup(fake_cloud)
    fake_cloud.tpu("run", *TARGET, "--workdir=gs://b/r", "--env=STUB_JCLIP_SLEEP=60", "--", "--config=x")
    wait_for(lambda: finished(fake_cloud, ["tpu-a"]), what="both workers' runs")
    done = fake_cloud.tpu("stop", *TARGET, "--timeout=20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("exited after SIGTERM") == 2
    for worker in (0, 1):
        assert list((fake_cloud.home("tpu-a", worker) / "stub-runs").glob("*.term"))
    assert fake_cloud.tpu("status", *TARGET).stdout.count("state=signalled rc=0") == 2


BABYSIT = ["--accelerator=v6e-8", "--capacity=spot", "--poll-seconds=0.05", "--jax-version=0.10.2",
           "--workdir=gs://b/r"]
ONE_PASS = ["create", "describe", "scp", "ssh:setup", "ssh:start"]


def collapse(steps: list[str]) -> list[str]:
    """Repeated polls count once: a describe after a describe, or after a describe + status."""
    out: list[str] = []
    for step in steps:
        if out[-1:] == [step] or step == "describe" and out[-2:] == ["describe", "ssh:status"]:
            continue
        out.append(step)
    return out


@pytest.mark.parametrize("extra,nodes",
                         [([], ["tpu-a"]), (["--direct"], ["tpu-a"]), (["--slices=2"], ["tpu-a-0", "tpu-a-1"])],
                         ids=["queued", "direct", "2-slices"])
def test_babysit_recreates_a_preempted_tpu_and_resumes(fake_cloud: FakeCloud, extra: list[str], nodes: list[str]) -> None:
    done = fake_cloud.tpu("babysit", *TARGET, *extra, *BABYSIT, "--max-retries=2", f"--python={fake_cloud.python}",
                          "--", "--config=x", env={"FAKE_GCLOUD_PREEMPTIONS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    broken = "PREEMPTED" if "--direct" in extra else "SUSPENDED"
    assert f"babysit: tpu-a is {broken}: retry 1 of 2" in done.stdout
    assert "babysit: run jclip finished on every worker" in done.stdout
    assert collapse(fake_cloud.steps()) == [
        "describe", *ONE_PASS, "describe", "delete", "describe", *ONE_PASS, "describe", "ssh:status"]
    assert finished(fake_cloud, nodes)


def test_babysit_reruns_a_failed_run_without_recreating(fake_cloud: FakeCloud) -> None:
    done = fake_cloud.tpu("babysit", *TARGET, *BABYSIT, f"--python={fake_cloud.python}", "--env=STUB_JCLIP_FAIL_ONCE=1",
                          "--", "--config=x")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the run ended on a worker: failed rc=1, failed rc=1: retry 1 of 5" in done.stdout
    steps = collapse(fake_cloud.steps())
    assert steps[:6] == ["describe", *ONE_PASS] and steps.count("create") == 1
    assert steps[6:] == ["describe", "ssh:status", "ssh:stop", "ssh:start", "describe", "ssh:status"]
    assert all(len(fake_cloud.stub_runs("tpu-a", worker)) == 2 for worker in (0, 1))


def test_babysit_stops_on_a_run_that_a_rerun_would_end_the_same_way(fake_cloud: FakeCloud) -> None:
    """Exit status 5 (a non-finite loss): no retry, one message, exit 1."""
    done = fake_cloud.tpu("babysit", *TARGET, *BABYSIT, f"--python={fake_cloud.python}", "--env=STUB_JCLIP_EXIT=5",
                          "--", "--config=x")
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("babysit: giving up: the run stopped on a worker (exit status 5: a non-finite loss or gradient), which a "
            "rerun would end with again") in done.stderr
    assert "retry" not in done.stdout
    assert all(len(fake_cloud.stub_runs("tpu-a", worker)) == 1 for worker in (0, 1))


def test_babysit_sets_up_and_starts_on_a_tpu_that_exists_already(fake_cloud: FakeCloud) -> None:
    fake_cloud.tpu("create", *TARGET, "--accelerator=v6e-8", "--wait", "--poll-seconds=0.01")
    done = fake_cloud.tpu("babysit", *TARGET, *BABYSIT, "--max-retries=0", f"--python={fake_cloud.python}",
                          "--", "--config=x")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run jclip: none (none, none)" in done.stdout
    assert collapse(fake_cloud.steps()[4:]) == [
        "describe", "ssh:status", "scp", "ssh:setup", "ssh:start", "describe", "ssh:status"]


def test_babysit_gives_up_after_max_retries(fake_cloud: FakeCloud) -> None:
    done = fake_cloud.tpu("babysit", *TARGET, "--direct", *BABYSIT, "--max-retries=2", f"--python={fake_cloud.python}",
                          "--", "--config=x", env={"FAKE_GCLOUD_PREEMPTIONS": "-1"})
    assert done.returncode == 1
    assert "babysit: giving up: tpu-a is PREEMPTED, after 2 retries (--max-retries=2)" in done.stderr
    assert fake_cloud.steps().count("create") == 3
    assert fake_cloud.steps().count("ssh:start") == 3
