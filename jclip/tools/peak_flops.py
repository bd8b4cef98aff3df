"""Peak matmul FLOP/s of the device a benchmark runs on, and model FLOPs utilisation (MFU) against it.

On TPUs and NVIDIA data-centre GPUs the peak is the vendor's published dense figure for the matmul type the
step's compute dtype runs as (JAX's default precision: float32 matmuls are one bfloat16 pass on TPU and TF32 on
Ampere and later GPUs). On CPU nothing is published that fits the machine, so the peak is measured: a jitted
2048 x 2048 x 2048 float32 `jnp.dot`, median of several runs. Other devices get no peak, and no MFU.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time

import jax
import jax.numpy as jnp

#: Dense (no structured sparsity) peak matmul TFLOP/s of one chip, which is one JAX device on all of these, by
#: the matmul type. TPUs: Google Cloud TPU documentation, system architecture pages of v4, v5e, v5p and v6e
#: (bf16 per chip; no float32 figure is published). GPUs: NVIDIA's A100, H100 and H200 datasheets, whose Hopper
#: tables give figures with sparsity: dense is half of those (H100 SXM bf16 1,979 -> 989).
PUBLISHED_TFLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6e": {"bfloat16": 918.0},
    "A100": {"bfloat16": 312.0, "tf32": 156.0},
    "H100 SXM": {"bfloat16": 989.0, "tf32": 494.5},
    "H100 PCIe": {"bfloat16": 756.5, "tf32": 378.0},
    "H100 NVL": {"bfloat16": 835.5, "tf32": 417.5},
    "H200": {"bfloat16": 989.0, "tf32": 494.5},
    "H200 NVL": {"bfloat16": 835.5, "tf32": 417.5},
}

#: `jax.devices()[0].device_kind`, lower-cased, -> chip of PUBLISHED_TFLOPS; the first pattern that matches wins.
#: JAX names v5e "TPU v5 lite", v5p "TPU v5" and v6e "TPU v6 lite"; the SXM H100 is "NVIDIA H100 80GB HBM3".
_DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    (r"^tpu v4$", "TPU v4"),
    (r"^tpu v5( lite|e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),
    (r"^tpu v6( lite|e)$", "TPU v6e"),
    (r"\ba100\b", "A100"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),  # \b: not the GH200 superchip
)

#: Size of the square float32 matmul that measures a CPU's peak.
CPU_MATMUL_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class Peak:
    """Peak matmul FLOP/s of one device, and where the figure comes from."""

    flops_per_second: float
    source: str
    measured_seconds: tuple[float, ...] = ()  # each timed run of a measured peak

    def as_dict(self) -> dict:
        return {"flops_per_second": self.flops_per_second, "source": self.source,
                "measured_seconds": list(self.measured_seconds)}


def chip_for_device_kind(device_kind: str) -> str | None:
    """The PUBLISHED_TFLOPS chip of a JAX `device_kind` string, or None when the table lacks it."""
    kind = device_kind.strip().lower()
    for pattern, chip in _DEVICE_KINDS:
        if re.search(pattern, kind):
            return chip
    return None


def matmul_type(chip: str, dtype: str) -> str | None:
    """The matmul type a compute dtype runs as on `chip` under JAX's default precision; None if unknown."""
    if dtype == "bfloat16":
        return "bfloat16"
    if dtype == "float32":
        return "bfloat16" if chip.startswith("TPU") else "tf32"
    return None


def published_peak(device_kind: str, dtype: str) -> Peak | None:
    """The published dense peak of one device of `device_kind` for compute `dtype`, or None."""
    chip = chip_for_device_kind(device_kind)
    if chip is None:
        return None
    kind = matmul_type(chip, dtype)
    tflops = PUBLISHED_TFLOPS[chip].get(kind) if kind else None
    if tflops is None:
        return None
    how = "" if kind == dtype else f" ({dtype} matmuls run as {kind} at JAX's default precision)"
    return Peak(tflops * 1e12, f"published: {chip} dense {kind} {tflops:g} TFLOP/s{how}")


def measure_cpu_peak(runs: int = 5, size: int = CPU_MATMUL_SIZE) -> Peak:
    """Measured float32 matmul FLOP/s of the default device: a jitted `jnp.dot` of two size x size matrices,
    compiled and run once untimed, then the median of `runs` timed runs (2 size^3 FLOPs each)."""
    keys = jax.random.split(jax.random.key(0))
    x, y = (jax.random.normal(key, (size, size), jnp.float32) for key in keys)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(x, y))
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        jax.block_until_ready(dot(x, y))
        seconds.append(time.perf_counter() - started)
    flops = 2.0 * size ** 3 / statistics.median(seconds)
    return Peak(flops, f"measured: jitted jnp.dot {size}x{size}x{size} float32, median of {runs}", tuple(seconds))


def device_peak(platform: str, device_kind: str, dtype: str) -> tuple[Peak | None, str]:
    """The peak of one device for the benchmark, with a note: measured on CPU, published where known."""
    if platform == "cpu":
        note = "" if dtype == "float32" else f"; the {dtype} step is measured against the float32 matmul peak"
        return measure_cpu_peak(), "CPU peak measured on this machine" + note
    peak = published_peak(device_kind, dtype)
    if peak is None:
        return None, (f"no published {dtype} peak known for {device_kind!r}: MFU omitted "
                      "(give one with --peak_tflops)")
    return peak, "vendor's published dense peak"


def mfu(model_flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s of the devices used."""
    return model_flops_per_step / step_seconds / peak_flops_per_second
