"""The micro run's process settings (jclip/tools/micro_run.py)."""

from __future__ import annotations

from jclip.tools.micro_run import cpu_env, with_cpu_devices


def test_the_device_count_is_replaced_and_other_xla_flags_are_kept():
    flags = "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
    assert with_cpu_devices(flags, 1).split() == [
        "--xla_dump_to=/tmp/d", "--xla_cpu_use_fusion_emitters=false", "--xla_force_host_platform_device_count=1"]


def test_a_count_is_added_where_none_is_named():
    assert with_cpu_devices("", 4) == "--xla_force_host_platform_device_count=4"
    assert with_cpu_devices("--xla_dump_to=/tmp/d", 2) == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"


def test_the_run_environment_keeps_the_rest_of_this_one(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JCLIP_SOMETHING", "kept")
    env = cpu_env(2, EXTRA="1")
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu" and env["JCLIP_SOMETHING"] == "kept" and env["EXTRA"] == "1"
