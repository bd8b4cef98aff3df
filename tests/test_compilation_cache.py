"""How the test session compiles (tests/compilation_cache.py): where the persistent cache points JAX, how it is
turned off, that an oversized folder is emptied instead of growing, and XLA's quick mode with its
`xla_optimized` exception."""

from __future__ import annotations

import subprocess
import sys

import compilation_cache
import jax
import pytest

CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def clear(monkeypatch) -> None:
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_zero_turns_the_cache_off(monkeypatch):
    clear(monkeypatch)
    monkeypatch.setenv("JCLIP_TEST_COMPILATION_CACHE", "0")
    assert compilation_cache.use_persistent_compilation_cache() is None
    assert "JAX_COMPILATION_CACHE_DIR" not in compilation_cache.os.environ


def test_a_folder_is_made_and_handed_to_jax_and_its_subprocesses(monkeypatch, tmp_path):
    clear(monkeypatch)
    folder = tmp_path / "cache"
    monkeypatch.setenv("JCLIP_TEST_COMPILATION_CACHE", str(folder))
    assert compilation_cache.use_persistent_compilation_cache() == folder
    environ = compilation_cache.os.environ
    assert folder.is_dir() and environ["JAX_COMPILATION_CACHE_DIR"] == str(folder)
    assert float(environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) == compilation_cache.MIN_COMPILE_SECONDS
    assert environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "0"


def test_an_oversized_folder_is_emptied_and_a_small_one_kept(monkeypatch, tmp_path):
    clear(monkeypatch)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "entry-cache").write_bytes(b"x" * 100)
    monkeypatch.setenv("JCLIP_TEST_COMPILATION_CACHE", str(folder))
    monkeypatch.setattr(compilation_cache, "MAX_CACHE_BYTES", 1000)
    compilation_cache.use_persistent_compilation_cache()
    assert (folder / "entry-cache").is_file()
    monkeypatch.setattr(compilation_cache, "MAX_CACHE_BYTES", 50)
    compilation_cache.use_persistent_compilation_cache()
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_subprocess_that_inherits_the_environment_writes_its_compile_into_the_folder(monkeypatch, tmp_path):
    """JAX itself, not this module, decides what the variables mean: a fresh interpreter that compiles one program
    must leave an entry in the folder (the minimum compile time is lowered so a tiny program qualifies)."""

    clear(monkeypatch)
    folder = tmp_path / "cache"
    monkeypatch.setenv("JCLIP_TEST_COMPILATION_CACHE", str(folder))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    compilation_cache.use_persistent_compilation_cache()
    program = "import jax, jax.numpy as jnp; print(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum())"
    result = subprocess.run([sys.executable, "-c", program], env={**compilation_cache.os.environ, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(path.name.endswith("-cache") for path in folder.iterdir()), sorted(p.name for p in folder.iterdir())


def quick_mode_in_a_fresh_interpreter() -> bool:
    """What jax reads from the environment this test session hands to the processes it starts."""
    program = "import jax; print(jax.config.values['jax_disable_most_optimizations'])"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    return {"True": True, "False": False}[done.stdout.strip()]


def test_quick_mode_reaches_jax_here_and_in_the_processes_tests_start():
    quick = compilation_cache.os.environ[compilation_cache.QUICK_MODE_VARIABLE] != "0"
    assert jax.config.values["jax_disable_most_optimizations"] is quick
    assert quick_mode_in_a_fresh_interpreter() is quick


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_compiles_fully_here_and_in_its_subprocesses():
    assert jax.config.values["jax_disable_most_optimizations"] is False
    assert quick_mode_in_a_fresh_interpreter() is False


def xla_flags_in_a_fresh_interpreter() -> list[str]:
    program = "import os; print(os.environ.get('XLA_FLAGS', ''))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()


def test_quick_xla_flags_go_with_quick_mode_to_the_processes_tests_start():
    quick = compilation_cache.os.environ[compilation_cache.QUICK_MODE_VARIABLE] != "0"
    flags = xla_flags_in_a_fresh_interpreter()
    assert all((flag in flags) is quick for flag in compilation_cache.QUICK_XLA_FLAGS), flags


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_starts_processes_without_the_quick_xla_flags():
    flags = xla_flags_in_a_fresh_interpreter()
    assert not any(flag in flags for flag in compilation_cache.QUICK_XLA_FLAGS), flags


def test_skipping_optimizations_adds_the_quick_flags_to_the_users_own(monkeypatch):
    monkeypatch.setenv(compilation_cache.QUICK_MODE_VARIABLE, "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    compilation_cache.skip_most_xla_optimizations()
    assert compilation_cache.os.environ["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/dump",
                                                                 *compilation_cache.QUICK_XLA_FLAGS]
    monkeypatch.setenv(compilation_cache.QUICK_MODE_VARIABLE, "0")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    compilation_cache.skip_most_xla_optimizations()
    assert compilation_cache.os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/dump"
