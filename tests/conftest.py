"""Test setup: 8 fake CPU devices, absl flags parsed (Grain workers), paths to ../shared."""

from __future__ import annotations

import os
import pathlib

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_enable_x64", False)
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("JCLIP_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """The ../shared folder of CI (reference values and real data); skips where a clone lacks it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: reference files live in ../shared, which only CI and developers have")
    return SHARED_DIR


@pytest.fixture(scope="session")
def reference_dir(shared_dir: pathlib.Path) -> pathlib.Path:
    path = shared_dir / "reference"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


# A model small enough that end-to-end tests compile and step in seconds on 2 CPU cores.
MICRO_MODEL_OVERRIDES = (
    "--config.model.embed_dim=32",
    "--config.model.vision.image_size=32",
    "--config.model.vision.patch_size=8",
    "--config.model.vision.width=32",
    "--config.model.vision.layers=1",
    "--config.model.vision.head_width=16",
    "--config.model.text.context_length=16",
    "--config.model.text.width=32",
    "--config.model.text.heads=2",
    "--config.model.text.layers=1",
)


@pytest.fixture(scope="session")
def scenes_data_dir(tmp_path_factory) -> pathlib.Path:
    """A TFDS data dir holding the `small` embedded dataset, built once per test session."""
    from jclip.data import embedded

    data_dir = tmp_path_factory.mktemp("tfds")
    for split in ("train", "validation"):
        embedded.load_source(split, data_dir=str(data_dir), config="small")
    return data_dir


def micro_run_flags(data_dir: pathlib.Path, **overrides) -> list[str]:
    """`jclip.main` flags for a micro CLIP run on the small embedded dataset, plus `--config.<k>=<v>`."""
    flags = [
        *MICRO_MODEL_OVERRIDES,
        "--config.data.embedded_config=small",
        f"--config.data.data_dir={data_dir}",
        "--config.data.batch_size=16",
        "--config.data.num_threads=1",
        "--config.log_every=1",
        "--config.evals.retrieval.every=0",
        "--config.evals.retrieval.limit=64",
        "--config.evals.retrieval.batch_size=32",
        "--config.evals.zeroshot.every=0",
        "--config.evals.zeroshot.limit=64",
        "--config.evals.zeroshot.batch_size=32",
        "--config.optim.warmup_steps=2",
    ]
    flags += [f"--config.{key}={value}" for key, value in overrides.items()]
    return flags


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> loss from a workdir's metrics.jsonl (the last line of a step wins, as after a resume)."""
    import json

    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
    return losses
