"""jclip.host_memory: with glibc kept from unmapping, an XLA:CPU program with a large temporary stops
page-faulting it in on every run (measured with getrusage's minor faults, in a fresh process each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROGRAM = r"""
import json, resource, sys
from jclip.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x, w1, w2):  # a 64 MB temporary, h (more than a thread's 64 MB arena can hold with its header)
    h = jnp.tanh(x @ w1)
    return (h @ w2).sum()

x, w1, w2 = jnp.ones((4096, 256)), jnp.ones((256, 4096)) / 256, jnp.ones((4096, 16))
f(x, w1, w2).block_until_ready(); f(x, w1, w2).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x, w1, w2).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults_per_run": faults}))
"""


def _faults(keep: str) -> dict:
    env = {**os.environ, "JCLIP_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_temporaries_stay_mapped_so_runs_stop_faulting():
    default = _faults("0")
    kept = _faults("1")
    if not kept["applied"]:
        pytest.skip("not glibc, or an accelerator plugin is installed: keep_freed_memory does nothing here")
    assert default["applied"] is False
    # 64 MB of temporaries are 16,384 fresh 4 KiB pages per run when glibc maps them anew.
    assert default["faults_per_run"] > 10_000, default
    assert kept["faults_per_run"] < default["faults_per_run"] / 20, (kept, default)
