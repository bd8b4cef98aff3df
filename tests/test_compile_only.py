"""`python -m jclip.main --compile_only` (jclip/compile_only.py): the train step compiled for a mesh of 8 fake
CPU devices from abstract inputs; the report's fields are positive, its parameter bytes per device equal the
shapes divided by their shardings (computed here independently), and nothing is written."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
from flax import nnx
from jclip_testing import MICRO_MODEL_OVERRIDES, REPO_ROOT, config_with_flags

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _report(stdout: str) -> dict[str, str]:
    fields = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(": ")
        if sep and " " not in name:
            fields[name] = value
    return fields


def _expected_param_bytes_per_device(model_overrides: tuple[str, ...]) -> int:
    """Each parameter's bytes divided by the mesh axes its partition spec (default rules) splits it over."""
    from jclip.models import abstract_model
    from jclip.parallel import DEFAULT_RULES

    config = config_with_flags(model_overrides)
    params = nnx.state(abstract_model(config.model), nnx.Param)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = nnx.get_partition_spec(params)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        total += math.prod(leaf.shape) * leaf.dtype.itemsize // math.prod(MESH[a] for a in axes)
    return total


def test_compile_only_reports_memory_and_flops_and_writes_nothing(tmp_path) -> None:
    overrides = (*MICRO_MODEL_OVERRIDES, "--config.model.scan_layers=True", "--config.model.remat=True")
    command = [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", "--compile_only", "--fake_devices=8",
               f"--workdir={tmp_path / 'run'}", *overrides, "--config.data.batch_size=32",
               *(f"--config.mesh.{axis}={size}" for axis, size in MESH.items())]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(result.stdout)
    assert report["devices"].startswith("8 (cpu")
    assert report["mesh"] == str(MESH)
    numbers = {name: float(value.split()[0]) for name, value in report.items()
               if name.endswith(("_bytes", "_bytes_per_device", "_bytes_total", "flops_per_device")) or name == "parameters"}
    for name in ("param_bytes_per_device", "opt_state_bytes_per_device", "batch_bytes_per_device",
                 "compiled_argument_bytes", "compiled_output_bytes", "compiled_temp_bytes",
                 "compiled_estimated_peak_bytes", "xla_flops_per_device", "parameters"):
        assert numbers[name] > 0, name
    assert float(report["compile_seconds"]) > 0 and float(report["model_flops_per_step"].split()[0]) > 0
    assert int(report["param_bytes_per_device"].split()[0]) == _expected_param_bytes_per_device(overrides)
    # AdamW's two moments of every (trainable) parameter, laid out like it, and a step count.
    assert int(report["opt_state_bytes_per_device"].split()[0]) >= 2 * int(report["param_bytes_per_device"].split()[0])
    assert not (tmp_path / "run").exists()
