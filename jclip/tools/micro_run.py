"""The micro CLIP run: a model and data small enough that `jclip.main` compiles and trains in seconds on CPU.

Shared by the end-to-end tests (tests/jclip_testing.py re-exports it) and the fault trials
(`jclip.tools.fault_trials`), which must train the same run.
"""

from __future__ import annotations

import os

#: A one-block CLIP with 32-wide towers on 32-pixel images and 16-token texts.
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


def micro_run_flags(data_dir: str | os.PathLike, **overrides) -> list[str]:
    """`jclip.main` flags for a micro CLIP run on the `small` embedded dataset in `data_dir` (built there on first
    use), logging every step, evaluating only at the end on a few examples, plus `--config.<k>=<v>`."""
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


def with_cpu_devices(xla_flags: str, devices: int) -> str:
    """`xla_flags` (a process's XLA_FLAGS) with `devices` fake CPU devices in place of any count it names, its other
    flags kept."""
    kept = [flag for flag in xla_flags.split() if not flag.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment (its other XLA flags kept) for a `jclip.main` process that sees `devices` fake
    CPU devices (one, as a user's CPU run, unless a test is about meshes), with `extra` variables."""
    flags = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


def compilation_cache_env(folder: str | os.PathLike, min_compile_seconds: float = 0.0) -> dict[str, str]:
    """The environment variables that point JAX's persistent compilation cache at `folder` for a process about to
    import jax (and for its children), writing every compile that took at least `min_compile_seconds`. Repeated
    micro runs (the fault trials, the test suite's subprocesses) then compile each program once."""
    return {"JAX_COMPILATION_CACHE_DIR": str(folder),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(min_compile_seconds),
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
