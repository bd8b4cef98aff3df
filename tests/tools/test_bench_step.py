"""`python -m jclip.tools.bench_step` end to end on a small explicit shape: the JSON report's keys and numbers,
the FLOPs against a count by hand and XLA's, the matmul floor's FLOPs against the same count, and the side by
side with OpenCLIP's step."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from jclip.models.flops import train_step_flops
from jclip.tools import bench_shapes
from jclip_testing import REPO_ROOT, cpu_env

SHAPE_FLAGS = ["--vision_width=64", "--vision_layers=2", "--patch_size=8", "--image_size=32", "--text_width=64",
               "--text_heads=2", "--text_layers=2", "--context_length=16", "--embed_dim=32"]
HAND_FLOPS_ARGS = (32, 8, 64, 2, 16, 64, 2, 32)  # hand_train_flops after the batch


def hand_train_flops(batch: int, image: int, patch: int, vision_width: int, vision_layers: int, context: int,
                     text_width: int, text_layers: int, embed: int) -> int:
    """3 x forward matmul FLOPs (2 per multiply-add): patch convolution, q/k/v, output and MLP kernels on every
    token, Q K^T and A V over every token pair, the projection of the pooled token."""
    def blocks(tokens: int, w: int, layers: int) -> int:
        per_token = 2 * (3 * w * w + w * w + 4 * w * w + 4 * w * w)
        return layers * (tokens * per_token + 2 * 2 * tokens * tokens * w)

    patches = (image // patch) ** 2
    vision = 2 * 3 * patch * patch * vision_width * patches + blocks(patches + 1, vision_width, vision_layers)
    vision += 2 * vision_width * embed
    text = blocks(context, text_width, text_layers) + 2 * text_width * embed
    return 3 * batch * (vision + text)


def test_analytic_flops_of_an_explicit_shape_equal_a_count_by_hand():
    overrides = {flag.removeprefix("--").split("=")[0]: int(flag.split("=")[1]) for flag in SHAPE_FLAGS}
    config = bench_shapes.train_config("cpu-tiny", 64, overrides=overrides)
    assert train_step_flops(config.model, 64) == hand_train_flops(64, *HAND_FLOPS_ARGS)


def run_bench(tmp_path, *flags: str) -> tuple[dict, str]:
    """Runs the tool on one CPU device; returns its JSON report and printed table."""
    path = tmp_path / "report.json"
    env = cpu_env(1)
    done = subprocess.run([sys.executable, "-m", "jclip.tools.bench_step", *SHAPE_FLAGS, *flags, f"--json={path}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(path.read_text()), done.stdout


@pytest.mark.slow
def test_cli_reports_time_flops_mfu_and_memory(tmp_path):
    report, table = run_bench(tmp_path, "--batch=64", "--steps=2", "--warmup=1", "--matmul_floor")
    assert report["overrides"]["vision_width"] == 64 and report["batch"] == 64 and report["devices"] == 1
    jclip = report["jclip"]
    assert len(jclip["step_seconds"]) == 1 and len(jclip["step_seconds"][0]) == 2
    median = jclip["median_step_seconds"]
    assert median > 0 and jclip["examples_per_second"] == pytest.approx(64 / median)
    assert math.isfinite(jclip["first_loss"]) and jclip["compile_seconds"] > 0

    flops = report["flops"]
    assert flops["model_flops_per_step"] == hand_train_flops(64, *HAND_FLOPS_ARGS)
    # XLA counts every matmul of the analytic count plus elementwise work (GELU, softmax, norms, the loss) and
    # AdamW over all 3.4 M parameters (most of them the token embedding, a fixed cost per step). Measured: 1.16
    # at batch 64 (1.36 at batch 16, where AdamW weighs more); below 1 would mean a matmul is not computed.
    assert 1.0 <= flops["xla_over_model"] <= 1.5

    peak = report["peak"]
    assert "measured" in peak["source"] and len(peak["measured_seconds"]) == 5 and peak["flops_per_second"] > 0
    assert jclip["achieved_flops_per_second"] == pytest.approx(flops["model_flops_per_step"] / median)
    assert jclip["mfu"] == pytest.approx(jclip["achieved_flops_per_second"] / peak["devices_flops_per_second"])

    memory = jclip["memory"]
    assert memory["device_peak_bytes_in_use"] is None  # CPU: no allocator statistics, so the two below
    assert memory["xla_estimated_peak_bytes_per_device"] > 0 and memory["process_max_rss_bytes"] > 0
    assert "examples/s" in table and "MFU" in table and "XLA / model" in table

    # The traced matmuls against the analytic count: the patch embedding's input gradient is not computed (the
    # pixels are not differentiated), and the loss's two logits matmuls (image x text^T and text x image^T, each
    # forward and two gradients) are not in the model count.
    floor = report["matmul_floor"]
    patch_forward = 2 * 64 * (32 // 8) ** 2 * (3 * 8 * 8) * 64
    logits = 2 * 3 * (2 * 64 * 64 * 32)
    assert floor["flops"] == flops["model_flops_per_step"] - patch_forward + logits
    assert floor["matmuls"] == sum(item["count"] for item in floor["by_shape"]) and floor["seconds"] > 0
    assert floor["share_of_step"] == pytest.approx(floor["seconds"] / median)
    assert floor["mfu_bound"] == pytest.approx(flops["model_flops_per_step"] / floor["seconds"]
                                               / peak["devices_flops_per_second"])
    assert "matmul floor" in table


@pytest.mark.slow
def test_against_openclip_side_by_side(tmp_path, openclip_python):
    report, table = run_bench(tmp_path, "--batch=16", "--steps=2", "--warmup=1", "--repeats=2",
                              f"--against-openclip={openclip_python}", "--peak_tflops=0.01")
    jclip, openclip = report["jclip"], report["openclip"]
    assert jclip["params"] == openclip["params"] > 0  # the same architecture, counted by each library
    assert jclip["decayed_params"] == openclip["decayed_params"] > 0  # and the same weight-decay split
    for side in (jclip, openclip):
        assert len(side["repeat_median_step_seconds"]) == 2 and side["examples_per_second"] > 0
        achieved = report["flops"]["model_flops_per_step"] / side["median_step_seconds"]
        assert side["mfu"] == pytest.approx(achieved / 1e10)  # --peak_tflops=0.01
    ratio = report["jclip_over_openclip"]
    assert ratio["params_equal"]
    assert ratio["examples_per_second"] == pytest.approx(jclip["examples_per_second"] / openclip["examples_per_second"])
    assert openclip["runtime"]["device"] == "cpu" and "jclip / OpenCLIP" in table


@pytest.mark.slow
def test_openclip_only_runs_no_jclip_step(tmp_path, openclip_python):
    report, _ = run_bench(tmp_path, "--batch=16", "--steps=2", "--warmup=1",
                          f"--against-openclip={openclip_python}", "--openclip-only")
    assert "jclip" not in report and "xla_flops_per_step" not in report["flops"]
    assert report["openclip"]["params"] == report["jclip_model"]["params"]
    assert report["openclip"]["examples_per_second"] > 0
