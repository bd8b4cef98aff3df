"""How the test session compiles quickly: a persistent XLA compilation cache, and XLA's quick mode, for the
session and the processes it starts.

Many tests compile the same programs: every `python -m jclip.main` subprocess compiles the micro model's train
step afresh, and in-process tests rebuild the same models and steps with new function objects. JAX's
persistent cache (keyed by the program, the compile options, the devices and the jax version) turns every
compile after the first into a file read. It is set through environment variables before jax is imported,
so the subprocesses the tests start inherit it.

The cache lives in `.pytest_cache/jax-compilation-cache` (git ignores it), so a developer's second run starts
warm; `JCLIP_TEST_COMPILATION_CACHE` names another folder, or `0` turns it off. A folder over
`MAX_CACHE_BYTES` is emptied at the start of the session rather than left to grow with every code change.

Most tests run micro models for a step or a few: compiling dominates, and XLA's backend optimisations (LLVM's)
cost more than they save. `JAX_DISABLE_MOST_OPTIMIZATIONS=1` skips them; the programs compute the same
operations, so every tolerance holds. Tests whose time is spent running real-sized models instead are marked
`xla_optimized` (conftest.py compiles them as a user's run is compiled). `JAX_DISABLE_MOST_OPTIMIZATIONS=0`
in the environment compiles the whole session fully optimised.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from jclip.tools.micro_run import compilation_cache_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO_ROOT / ".pytest_cache" / "jax-compilation-cache"
MAX_CACHE_BYTES = 4 << 30
# Compiles faster than this are cheaper to redo than to hash, write and read back.
MIN_COMPILE_SECONDS = 0.1
# jax reads it at import: 1 compiles without XLA's backend (LLVM) optimisations.
QUICK_MODE_VARIABLE = "JAX_DISABLE_MOST_OPTIMIZATIONS"
# XLA:CPU's older loop emitters: without LLVM's optimisations they compile the micro train step 1.7-2x faster
# than the default fusion emitters (2.85 -> 1.6 s on one device). Fully optimised they compile and run slower
# (the cpu-tiny step: 640 against 750 examples/s), so only quick mode uses them. One codegen module instead of
# parallel ones saves another 5-10% of the compile's CPU time, which is what two busy test workers pay for.
QUICK_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def use_persistent_compilation_cache() -> pathlib.Path | None:
    """Points JAX (this process and its children, through the environment) at the test cache folder; returns
    the folder, or None where `JCLIP_TEST_COMPILATION_CACHE=0` turns the cache off."""
    setting = os.environ.get("JCLIP_TEST_COMPILATION_CACHE", "")
    if setting == "0":
        return None
    folder = pathlib.Path(setting) if setting else DEFAULT_CACHE_DIR
    if folder.is_dir() and folder_bytes(folder) > MAX_CACHE_BYTES:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in compilation_cache_env(folder, MIN_COMPILE_SECONDS).items():
        os.environ.setdefault(name, value)
    return folder


def skip_most_xla_optimizations() -> None:
    """XLA's quick mode (and `QUICK_XLA_FLAGS`) for this process and its children, through the environment,
    unless the environment already chooses."""
    os.environ.setdefault(QUICK_MODE_VARIABLE, "1")
    if os.environ[QUICK_MODE_VARIABLE] != "0":
        os.environ["XLA_FLAGS"] = " ".join([*os.environ.get("XLA_FLAGS", "").split(), *QUICK_XLA_FLAGS])


def without_quick_xla_flags(xla_flags: str) -> str:
    """`xla_flags` less `QUICK_XLA_FLAGS`: what a process compiling fully optimised gets."""
    return " ".join(flag for flag in xla_flags.split() if flag not in QUICK_XLA_FLAGS)
