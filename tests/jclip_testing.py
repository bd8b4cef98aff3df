"""Helpers shared by the tests (imported by name: tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_small_config(**overrides: Any) -> dict[str, Any]:
    """A two-layer CLIP with 32-wide towers, 2 heads each, a 64-token vocabulary."""
    config = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                   "mlp_ratio": 4.0},
        "text": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    }
    config.update(overrides)
    return config


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
        "--config.evals.compositional.every=0",
        "--config.evals.compositional.limit=32",
        "--config.evals.compositional.batch_size=32",
        "--config.optim.warmup_steps=2",
    ]
    flags += [f"--config.{key}={value}" for key, value in overrides.items()]
    return flags


def run_jclip_main(workdir: pathlib.Path, config: str, flags: list[str], timeout: int = 600) -> str:
    """Runs `python -m jclip.main` in a subprocess; asserts success and returns its stdout."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "jclip.main", f"--config={config}", f"--workdir={workdir}", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> loss from a workdir's metrics.jsonl (the last line of a step wins, as after a resume)."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
    return losses


def read_final_evaluation(workdir: pathlib.Path) -> dict[str, float]:
    """Every `eval/<name>/<metric>` of a workdir's metrics.jsonl, the last value of each (timings left out)."""
    values = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values.update({k: v for k, v in record.items() if k.startswith("eval/") and not k.endswith("/seconds")})
    return values


def micro_config(**overrides):
    from configs import clip

    config = clip.get_config()
    config.model.embed_dim = 16
    config.model.vision.update(image_size=16, patch_size=8, width=16, layers=1, head_width=8)
    config.model.text.update(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    config.data.batch_size = 16
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    n = config.data.batch_size
    size = config.model.vision.image_size
    length = config.model.text.context_length
    token_ids = rng.integers(1, 60, size=(n, length)).astype(np.int32)
    token_ids[:, -1] = 63  # the end token is the largest id
    return {"images": rng.normal(size=(n, size, size, 3)).astype(np.float32), "token_ids": token_ids}


def rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected| (float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_features(seed: int, n: int, d: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unnormalised image and text features [n, d]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(n, d)).astype(dtype)


def fwd_bwd_temp_bytes(loss, n_rows: int, d: int, mesh, num_scalars: int = 1) -> int:
    """XLA's per-device temp allocation for the jitted forward + backward of `loss(x, y, *scalars)` on
    [n_rows, d] embeddings (batch-sharded over `mesh`, or on one device when it is None) and float32 scalars."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jclip.parallel import batch_spec

    sharding = None if mesh is None else NamedSharding(mesh, batch_spec(2))
    spec = jax.ShapeDtypeStruct((n_rows, d), jnp.float32, sharding=sharding)
    scalars = [jax.ShapeDtypeStruct((), jnp.float32)] * num_scalars
    grad = jax.value_and_grad(loss, argnums=tuple(range(2 + num_scalars)))
    return int(jax.jit(grad).lower(spec, spec, *scalars).compile().memory_analysis().temp_size_in_bytes)


def scene_captions(n: int, seed: int = 0) -> list[str]:
    """`n` alt-text-like captions of the embedded dataset's scene generator (seeded)."""
    from jclip.data.sources import scenes

    rng = np.random.default_rng(seed)
    return [scenes.short_caption(scenes.sample_scene(rng), rng) for _ in range(n)]


def dense_scene_captions(n: int, seed: int = 0) -> list[str]:
    """`n` dense descriptions (several sentences each) of the embedded dataset's scene generator (seeded)."""
    from jclip.data.sources import scenes

    rng = np.random.default_rng(seed)
    return [scenes.dense_caption(scenes.sample_scene(rng)) for _ in range(n)]


def run_reference(python: str, script: str, inputs: dict[str, Any], tmp_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Runs `script` in another interpreter (the PyTorch reference environment) with `inputs` as JSON in
    sys.argv[1]; the script writes an npz to sys.argv[2], returned as arrays."""
    import subprocess

    inputs_path, outputs_path = tmp_path / "reference_inputs.json", tmp_path / "reference_outputs.npz"
    inputs_path.write_text(json.dumps(inputs))
    result = subprocess.run([python, "-c", script, str(inputs_path), str(outputs_path)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(outputs_path) as outputs:
        return {key: outputs[key] for key in outputs.files}


def negative_pools_of(generator, caption: str) -> dict[str, tuple[str, ...]]:
    """A negatives generator's pools for one caption."""
    [result] = generator.generate([caption])
    return result.pools
