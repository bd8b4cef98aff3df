"""The GKE manifests in launch/gke/: their Job templates are valid Kubernetes (the API schema, strict, offline with
kubernetes-validate), and what they hand jclip agrees with jclip: the config file and every override exist, the
environment variables are ones jclip reads, process 0's address is the one JobSet gives pod 0, and the process
and chip counts match the slice."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import yaml

from launch_testing import REPO

MANIFESTS = sorted((REPO / "launch" / "gke").glob("*.yaml"))
KUBERNETES_VERSION = "1.33"  # GKE's regular channel in 2026


def load(path):
    (jobset,) = yaml.safe_load_all(path.read_text())
    (workers,) = jobset["spec"]["replicatedJobs"]
    return jobset, workers


def container(workers):
    (only,) = workers["template"]["spec"]["template"]["spec"]["containers"]
    return only


def jclip_args(only) -> list[str]:
    return [arg for arg in only["args"] if arg.startswith("--")]


def test_there_are_tpu_and_gpu_manifests():
    assert {path.name for path in MANIFESTS} == {"tpu-v6e-16.yaml", "h100-2x8.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_job_template_is_valid_kubernetes(path):
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate").validate
    jobset, workers = load(path)
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": jobset["metadata"]["name"]},
           "spec": workers["template"]["spec"]}
    validate(job, KUBERNETES_VERSION, strict=True)  # raises on unknown fields or wrong types


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_config_and_every_override_exist(path):
    from configs import clip

    args = jclip_args(container(load(path)[1]))
    (config_arg,) = [arg for arg in args if arg.startswith("--config=")]
    config_file, _, config_args = config_arg.removeprefix("--config=").partition(":")
    assert config_file == "configs/clip.py" and (REPO / config_file).is_file()
    config = clip.get_config(config_args or None)
    for arg in args:
        if arg.startswith("--config."):
            key = arg.removeprefix("--config.").split("=", 1)[0]
            node = config
            for part in key.split("."):
                assert part in node, f"{path.name}: no config field {key}"
                node = node[part]
    (workdir,) = [arg for arg in args if arg.startswith("--workdir=")]
    assert workdir.startswith("--workdir=gs://"), "a GKE pod's disk does not outlive it: the workdir is a bucket"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_jclip_variable_is_one_jclip_reads(path):
    sources = "".join((REPO / "jclip" / name).read_text() for name in ("cli.py", "main.py"))
    names = [item["name"] for item in container(load(path)[1])["env"]]
    for name in names:
        if name.startswith("JCLIP_"):
            assert f'"{name}"' in sources, f"{path.name}: jclip does not read {name}"
    assert "JCLIP_PREEMPTED_EXIT_CODE" in names, "a preemption save must fail the pod, or JobSet never reruns it"


def test_the_gpu_job_names_pod_0_as_process_0_and_counts_its_processes():
    jobset, workers = load(REPO / "launch" / "gke" / "h100-2x8.yaml")
    only = container(workers)
    env = {item["name"]: item for item in only["env"]}
    name, job = jobset["metadata"]["name"], workers["name"]
    host, port = env["JCLIP_COORDINATOR_ADDRESS"]["value"].rsplit(":", 1)
    assert host == f"{name}-{job}-0-0.{name}"
    assert int(port) in [p["containerPort"] for p in only["ports"]]
    spec = workers["template"]["spec"]
    assert int(env["JCLIP_NUM_PROCESSES"]["value"]) == spec["parallelism"] * workers["replicas"] == spec["completions"]
    assert spec["completionMode"] == "Indexed"
    assert env["JCLIP_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    script = only["command"][2]
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    for sourced in re.findall(r"source (\S+)", script):
        assert (REPO / sourced).is_file(), sourced


def test_the_tpu_job_has_one_pod_per_host_of_the_slice():
    _, workers = load(REPO / "launch" / "gke" / "tpu-v6e-16.yaml")
    pod = workers["template"]["spec"]["template"]["spec"]
    chips = math.prod(int(n) for n in pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"))
    per_host = pod["containers"][0]["resources"]["limits"]["google.com/tpu"]
    assert workers["template"]["spec"]["parallelism"] * per_host == chips == 16
    assert "--distributed=on" in container(workers)["args"]
