"""Golden --dry-run output of launch/tpu.py: the exact gcloud (and git) commands of each subcommand.

The commands run in a small fixed git tree (launch_testing.git_tree) with a fixed --jax-version, so the
source hash and the commit are the same on every machine; the one machine-dependent part, the temporary folder of
the staged tarball, is written as $TMPDIR. This test only compares. After an intended change, regenerate the
files with `python tests/launch/test_tpu_golden.py --regenerate` and review the diff.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_testing import git_tree, run_tpu  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
COMMON = ["--name=tpu-a", "--zone=us-east5-b", "--project=my-project", "--dry-run"]
PIN = "--jax-version=0.10.2"
CASES: dict[str, list[str]] = {
    "create-queued-on-demand": ["create", "--accelerator=v6e-8"],
    "create-queued-spot-wait": ["create", "--accelerator=v5p-64", "--capacity=spot", "--wait"],
    "create-queued-reserved": ["create", "--accelerator=v4-32", "--capacity=reserved"],
    "create-direct-on-demand": ["create", "--direct", "--accelerator=v6e-8"],
    "create-direct-spot": ["create", "--direct", "--accelerator=v5e-16", "--capacity=spot"],
    "create-direct-reserved": ["create", "--direct", "--accelerator=v5litepod-8", "--capacity=reserved",
                               "--runtime=my-runtime"],
    "create-2-slices": ["create", "--accelerator=v6e-16", "--slices=2", "--capacity=spot", "--wait"],
    "setup": ["setup", PIN],
    "setup-commit-2-slices": ["setup", "--slices=2", "--commit=HEAD", PIN, "--python=python3.11"],
    "run": ["run", "--workdir=gs://bucket/runs/b32", "--env=TFDS_DATA_DIR=gs://bucket/tfds", "--coordinator-port=8476",
            "--", "--config=configs/clip.py:model=B/32", "--config.name=it's $HOME; ok"],
    "run-2-slices": ["run", "--slices=2", "--run-name=b16", "--workdir=gs://bucket/runs/b16",
                     "--", "--config=configs/clip.py"],
    "stop": ["stop", "--timeout=120"],
    "delete-queued": ["delete"],
    "delete-direct": ["delete", "--direct"],
    "logs": ["logs", "--worker=1", "--lines=20"],
    "status": ["status"],
    "status-direct": ["status", "--direct", "--run-name=b16"],
    "babysit": ["babysit", "--accelerator=v5p-64", "--capacity=spot", PIN, "--workdir=gs://bucket/runs/b16",
                "--max-retries=3", "--", "--config=configs/clip.py:model=B/16"],
}
FILES = {
    "setup.py": "# stand-in for jclip's setup.py\n",
    "launch/tpu_worker.sh": "# stand-in for the worker script\n",
    "launch/tpu_setup_worker.sh": "# stand-in for the setup script\n",
}


def argv(case: str) -> list[str]:
    command, *rest = CASES[case]
    return [command, *COMMON, *rest]


def dry_run(case: str, tree: Path, tmpdir: Path) -> str:
    """`$ launch/tpu.py ARGS` and then what it printed, the temporary folder written as $TMPDIR."""
    done = run_tpu(argv(case), cwd=tree, env=dict(os.environ, TMPDIR=str(tmpdir)))
    assert done.returncode == 0, done.stderr
    return f"$ launch/tpu.py {shlex.join(argv(case))}\n" + done.stdout.replace(str(tmpdir), "$TMPDIR")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return git_tree(tmp_path_factory.mktemp("tree"), FILES, untracked={"notes.txt": "untracked, shipped\n"})


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_its_golden_file(case: str, tree: Path, tmp_path: Path) -> None:
    expected = (GOLDEN / f"{case}.txt").read_text()
    assert dry_run(case, tree, tmp_path) == expected


def test_every_golden_file_has_a_case() -> None:
    assert sorted(path.stem for path in GOLDEN.glob("*.txt")) == sorted(CASES)


def regenerate() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tree = git_tree(Path(scratch) / "tree", FILES, untracked={"notes.txt": "untracked, shipped\n"})
        tmpdir = Path(scratch) / "tmp"
        tmpdir.mkdir()
        GOLDEN.mkdir(exist_ok=True)
        for case in CASES:
            (GOLDEN / f"{case}.txt").write_text(dry_run(case, tree, tmpdir))
            print(f"wrote {GOLDEN / case}.txt")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate()
