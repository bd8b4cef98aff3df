"""Peak FLOP/s and MFU: the published table is reached from the device_kind strings JAX reports, the CPU peak is
a measured matmul rate, MFU is achieved over peak."""

from __future__ import annotations

import pytest

from jclip.tools import peak_flops

# (device_kind as JAX reports it, dense bf16 TFLOP/s, dense float32-as-run TFLOP/s), from Google Cloud's TPU pages
# and NVIDIA's datasheets (half their with-sparsity figures). TPU float32 runs as one bf16 pass by default.
KNOWN_KINDS = [
    ("TPU v4", 275, 275),
    ("TPU v5 lite", 197, 197),  # v5e
    ("TPU v5e", 197, 197),
    ("TPU v5", 459, 459),  # v5p
    ("TPU v5p", 459, 459),
    ("TPU v6 lite", 918, 918),  # v6e (Trillium)
    ("NVIDIA A100-SXM4-80GB", 312, 156),
    ("NVIDIA A100-SXM4-40GB", 312, 156),
    ("NVIDIA A100 80GB PCIe", 312, 156),
    ("NVIDIA H100 80GB HBM3", 989, 494.5),  # SXM
    ("NVIDIA H100 PCIe", 756.5, 378),
    ("NVIDIA H100 NVL", 835.5, 417.5),
    ("NVIDIA H200", 989, 494.5),
]


@pytest.mark.parametrize("kind,bf16,f32", KNOWN_KINDS)
def test_published_peak_of_real_device_kinds(kind, bf16, f32):
    assert peak_flops.published_peak(kind, "bfloat16").flops_per_second == pytest.approx(bf16 * 1e12)
    assert peak_flops.published_peak(kind, "float32").flops_per_second == pytest.approx(f32 * 1e12)


@pytest.mark.parametrize("kind", ["NVIDIA GH200 480GB", "TPU v4 lite", "TPU7x", "Tesla V100-SXM2-16GB", "cpu", ""])
def test_unknown_devices_have_no_peak_and_say_so(kind):
    assert peak_flops.published_peak(kind, "bfloat16") is None
    peak, note = peak_flops.device_peak("gpu", kind, "bfloat16")
    assert peak is None and "MFU omitted" in note


def test_the_peak_names_its_source():
    peak = peak_flops.published_peak("NVIDIA H100 80GB HBM3", "float32")
    assert "H100 SXM" in peak.source and "tf32" in peak.source


def test_cpu_peak_is_a_measured_matmul_rate():
    peak = peak_flops.measure_cpu_peak(runs=3, size=256)
    seconds = sorted(peak.measured_seconds)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert peak.flops_per_second == pytest.approx(2 * 256 ** 3 / seconds[1])
    assert "measured" in peak.source


def test_mfu_is_achieved_over_peak():
    # 6e12 FLOPs in 2 s is 3e12 FLOP/s; against a 12e12 FLOP/s peak that is a quarter.
    assert peak_flops.mfu(6e12, 2.0, 12e12) == pytest.approx(0.25)
