"""Keep freed host memory in the process, so XLA:CPU stops page-faulting its temporaries in on every step.

An XLA:CPU executable allocates its temporaries as one block per run (427 MB for the `cpu-tiny` train step
of `jclip.tools.bench_step`) through `posix_memalign`, from one of XLA's worker threads. glibc serves a block that
large from a fresh `mmap` and returns it with `munmap` when the run ends: a thread's arena cannot hold it, and
above 32 MB no `M_MMAP_THRESHOLD` applies. Every step then faults all of that memory back in, page by page,
and the kernel zeroes each page: 105,000 minor faults and 0.15 CPU-seconds of kernel time per step of
`cpu-tiny`, a quarter of the step's CPU time.

`keep_freed_memory()` asks glibc for one arena, no mmap and no trimming (`mallopt`): the freed block stays
in the heap and the next step reuses it. It must run before the JAX backend starts its threads (a thread keeps
the arena it started with), which is why jclip's entry points call it first. The price is that the process's
resident memory stays at its peak: what a training process does anyway. It applies where JAX computes on
the host CPU alone (no accelerator plugin installed; accelerators' own memory is untouched either way), on
glibc; elsewhere, or with `JCLIP_KEEP_HOST_MEMORY=0`, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

#: Packages whose presence means JAX will compute on an accelerator, not the host.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

_applied = False


def _accelerator_installed() -> bool:
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap, no trim; True when it did (now or on an earlier call).

    Call it before the first JAX computation of the process: arenas are chosen when threads first allocate."""
    global _applied
    if _applied:
        return True
    if os.environ.get("JCLIP_KEEP_HOST_MEMORY", "1").strip() == "0" or _accelerator_installed():
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(option, value) == 1 for option, value in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
    return _applied


__all__ = ["keep_freed_memory"]
