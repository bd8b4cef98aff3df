"""The micro run's process settings (jclip/tools/micro_run.py)."""

from __future__ import annotations

from jclip.tools.micro_run import with_cpu_devices


def test_the_device_count_is_replaced_and_other_xla_flags_are_kept():
    flags = "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
    assert with_cpu_devices(flags, 1).split() == [
        "--xla_dump_to=/tmp/d", "--xla_cpu_use_fusion_emitters=false", "--xla_force_host_platform_device_count=1"]


def test_a_count_is_added_where_none_is_named():
    assert with_cpu_devices("", 4) == "--xla_force_host_platform_device_count=4"
    assert with_cpu_devices("--xla_dump_to=/tmp/d", 2) == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2"
