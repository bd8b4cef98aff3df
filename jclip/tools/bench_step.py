"""Train-step benchmark: step time, examples/s, FLOPs, MFU and memory of jclip's real train step, optionally
side by side with OpenCLIP's.

    python -m jclip.tools.bench_step                                  # cpu-tiny, batch 256
    python -m jclip.tools.bench_step --shape=B/16 --batch=512 --dtype=bfloat16 --json=b16.json
    python -m jclip.tools.bench_step --shape=cpu-small --against-openclip=/path/to/openclip-venv/bin/python --repeats=3

A shape is a preset (tiny, B/32, B/16, L/14, g/14) or a benchmark shape (cpu-tiny, cpu-small), with tower sizes
overridable by flags (jclip.tools.bench_shapes). The step is jclip's (jclip.tools.train_step_timing) on one
data-parallel mesh over every device, with configs/clip.py's optimizer. Reported: the median step time of the
timed steps after warm-up and examples/s; the model FLOPs of a step (jclip.models.flops: 3 x forward, OpenCLIP's
counting) beside XLA's own count; achieved FLOP/s and MFU against the device's matmul peak (jclip.tools.peak_flops:
published for TPUs and NVIDIA GPUs, measured on CPU); peak memory (the device allocator's where it keeps one,
else XLA's estimate and the process's max RSS). `--matmul_floor` times each of the step's matmuls alone
(jclip.tools.matmul_floor): how much of the step they take, and the MFU they bound. `--against-openclip` runs
jclip.tools.openclip_step.py with that interpreter on the same shapes, `--repeats` times alternating with jclip,
each a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any

#: The OpenCLIP side: a script run by path with the other interpreter.
OPENCLIP_SCRIPT = pathlib.Path(__file__).with_name("openclip_step.py")
SIZE_FLAGS = ("vision_width", "vision_layers", "patch_size", "image_size", "text_width", "text_heads", "text_layers",
              "context_length", "embed_dim")  # jclip.tools.bench_shapes.OVERRIDES
#: The optimizer settings both sides share (configs/common.py's defaults).
OPTIM_KEYS = ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip_norm")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="cpu-tiny",
                        help="tiny, B/32, B/16, L/14, g/14 (model presets) or cpu-tiny, cpu-small (benchmark shapes)")
    for flag in SIZE_FLAGS:
        parser.add_argument(f"--{flag}", type=int, default=None, help="override the shape's value")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the shape's, else 128)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each repeat's timed ones (>= 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timings of each side, alternating jclip and OpenCLIP; medians are reported")
    parser.add_argument("--against-openclip", "--against_openclip", dest="openclip_python", default=None,
                        metavar="PYTHON", help="an interpreter with torch and open_clip: time OpenCLIP's step too")
    parser.add_argument("--openclip-only", "--openclip_only", dest="openclip_only", action="store_true",
                        help="with --against-openclip: time OpenCLIP alone (jclip's step is not run: on a GPU the "
                             "two would share its memory)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak matmul TFLOP/s of one device, instead of the known or measured one")
    parser.add_argument("--matmul_floor", "--matmul-floor", dest="matmul_floor", action="store_true",
                        help="also time each matmul of jclip's step alone (jclip.tools.matmul_floor): the step time "
                             "its matmuls alone take, and the MFU that bounds")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report here as JSON")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    if args.openclip_only and not args.openclip_python:
        parser.error("--openclip-only needs --against-openclip=PYTHON")
    if args.openclip_only and args.matmul_floor:
        parser.error("--matmul_floor times jclip's step: it cannot go with --openclip-only")
    return args


def run_openclip(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One timing of OpenCLIP's step in a fresh `python` process; its JSON line."""
    done = subprocess.run([python, str(OPENCLIP_SCRIPT), json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{OPENCLIP_SCRIPT.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def openclip_spec(config: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The JSON argument of openclip_step.py for the same model, batch, dtype, optimizer and step counts."""
    from jclip.convert.openclip import openclip_model_config

    optim = config.optim
    return {
        "model": openclip_model_config(config.model),
        "batch": int(config.data.batch_size),
        "dtype": args.dtype,
        "device": device,
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": int(config.seed),
        "optim": {key: float(optim[key]) for key in OPTIM_KEYS},
        "max_log_logit_scale": float(optim.max_log_logit_scale),
    }


def _summary(step_seconds: list[list[float]], batch: int, model_flops: int, peak: float | None) -> dict[str, Any]:
    """Per-repeat medians, their median, examples/s, achieved FLOP/s and MFU."""
    from jclip.tools import peak_flops

    medians = [statistics.median(seconds) for seconds in step_seconds]
    median = statistics.median(medians)
    return {
        "step_seconds": step_seconds,
        "repeat_median_step_seconds": medians,
        "median_step_seconds": median,
        "examples_per_second": batch / median,
        "achieved_flops_per_second": model_flops / median,
        "mfu": peak_flops.mfu(model_flops, median, peak) if peak else None,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark the arguments describe; the report as a JSON-ready dict."""
    import jax

    from jclip.build import TrainSetup
    from jclip.models.flops import train_step_flops
    from jclip.tools import bench_shapes, peak_flops, train_step_timing
    from jclip.train import run_mesh

    batch = args.batch or bench_shapes.default_batch(args.shape)
    overrides = {flag: getattr(args, flag) for flag in SIZE_FLAGS}
    config = bench_shapes.train_config(args.shape, batch, args.dtype, overrides)
    device = jax.devices()[0]
    devices = jax.device_count()
    if args.matmul_floor and devices > 1:
        raise SystemExit(f"--matmul_floor times the step's matmuls at their global shapes on one device, and jax sees "
                         f"{devices}: make one visible")
    if args.openclip_python and devices > 1:
        raise SystemExit(f"--against-openclip compares one device with one device, and jax sees {devices}: make one "
                         "visible (e.g. CUDA_VISIBLE_DEVICES=0; on CPU, no fake devices in XLA_FLAGS)")
    model_flops = train_step_flops(config.model, batch)
    notes = []
    if args.peak_tflops:
        peak = peak_flops.Peak(args.peak_tflops * 1e12, "given with --peak_tflops")
        notes.append("peak given on the command line")
    else:
        peak, note = peak_flops.device_peak(device.platform, device.device_kind, args.dtype)
        notes.append(note)
    # CPU devices (fake ones included) share one host, whose peak was measured; accelerators add up.
    peak_total = None if peak is None else peak.flops_per_second * (1 if device.platform == "cpu" else devices)

    report: dict[str, Any] = {
        "shape": args.shape,
        "overrides": {flag: value for flag, value in overrides.items() if value is not None},
        "model": bench_shapes.describe_model(config.model),
        "batch": batch,
        "dtype": args.dtype,
        "devices": devices,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "optimizer": {key: float(config.optim[key]) for key in OPTIM_KEYS},
        "peak": None if peak is None else {**peak.as_dict(), "devices_flops_per_second": peak_total},
        "notes": notes,
    }
    step = None
    if args.openclip_only:
        params, decayed = train_step_timing.parameter_counts(TrainSetup.create(config, run_mesh(config)))
    else:
        step = train_step_timing.CompiledStep.build(config)
        params, decayed = train_step_timing.parameter_counts(step.setup)
    report["flops"] = {"model_flops_per_step": model_flops}
    if step is not None:
        xla_flops = step.xla_flops()
        report["flops"].update(xla_flops_per_step=xla_flops, xla_over_model=xla_flops / model_flops)
        notes.append("model FLOPs: 3 x forward matmuls (jclip.models.flops, OpenCLIP's counting); XLA's count "
                     "also has elementwise work (GELU, softmax, norms, the loss, AdamW) and each device's "
                     "replicated optimizer update")

    jclip_times, openclip_runs, first_losses = [], [], []
    spec = openclip_spec(config, args, "cuda" if device.platform == "gpu" else "cpu") if args.openclip_python else None
    for _ in range(args.repeats):
        if step is not None:
            seconds, first_loss = step.time_steps(args.warmup, args.steps)
            jclip_times.append(seconds)
            first_losses.append(first_loss)
        if spec is not None:
            openclip_runs.append(run_openclip(args.openclip_python, spec))

    if step is not None:
        report["jclip"] = {
            "params": params,
            "decayed_params": decayed,
            "compile_seconds": step.compile_seconds,
            "first_loss": first_losses[0],
            **_summary(jclip_times, batch, model_flops, peak_total),
            "memory": {
                "device_peak_bytes_in_use": train_step_timing.device_peak_bytes_in_use(),
                "xla_estimated_peak_bytes_per_device": step.xla_estimated_peak_bytes(),
                "process_max_rss_bytes": train_step_timing.max_rss_bytes(),
            },
        }
    if openclip_runs:
        first = openclip_runs[0]
        report["openclip"] = {
            "params": first["params"],
            "decayed_params": first["decayed_params"],
            "first_loss": first["first_loss"],
            **_summary([run["step_seconds"] for run in openclip_runs], batch, model_flops, peak_total),
            "memory": {"device_peak_memory_allocated_bytes": first["peak_memory_allocated_bytes"]},
            "runtime": {key: first[key] for key in ("device", "torch", "open_clip", "torch_threads")},
        }
        if step is None:
            report["jclip_model"] = {"params": params, "decayed_params": decayed}  # its step was not run
    if step is not None and args.matmul_floor:
        report["matmul_floor"] = _matmul_floor(step, report, model_flops, peak_total)
    if "jclip" in report and "openclip" in report:
        jclip_side, openclip_side = report["jclip"], report["openclip"]
        report["jclip_over_openclip"] = {
            "examples_per_second": jclip_side["examples_per_second"] / openclip_side["examples_per_second"],
            "step_seconds": jclip_side["median_step_seconds"] / openclip_side["median_step_seconds"],
            "params_equal": jclip_side["params"] == openclip_side["params"],
        }
    return report


def _matmul_floor(step: Any, report: dict[str, Any], model_flops: int, peak: float | None) -> dict[str, Any]:
    """Each matmul of the step timed alone: their total against the step's median, and the MFU bound."""
    from jclip import parallel
    from jclip.tools.matmul_floor import matmul_floor

    with parallel.sharding_context(step.setup.mesh, step.setup.rules):
        floor = matmul_floor(step.jitted, step.state, step.batch, None,
                             progress=lambda line: print(f"  {line}", end="\r", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    found = floor.as_dict()
    found["share_of_step"] = floor.seconds / report["jclip"]["median_step_seconds"]
    found["rate_over_peak"] = found["flops_per_second"] / peak if peak else None
    found["mfu_bound"] = model_flops / floor.seconds / peak if peak else None
    return found


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2 ** 30:.3f} GiB"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    sides = [name for name in ("jclip", "openclip") if name in report]
    model = report["model"]
    shape = report["shape"] + (f" with {report['overrides']}" if report["overrides"] else "")
    lines = [
        f"train step: {shape}, batch {report['batch']}, {report['dtype']} compute, "
        f"{report['devices']} device(s) ({report['platform']}, {report['device_kind']})",
        f"  vision {model['vision']}, text {model['text']}, embed_dim {model['embed_dim']}",
        f"  {report['warmup_steps']} warm-up + {report['timed_steps']} timed steps, x{report['repeats']} repeat(s)",
        "",
        f"{'':<34}" + "".join(f"{name:>16}" for name in sides),
    ]

    def row(label: str, key: str, spec: str, scale: float = 1.0) -> None:
        values = [report[name].get(key) for name in sides]
        lines.append(f"{label:<34}" + "".join(
            f"{_number(v if v is None or scale == 1.0 else v * scale, spec):>16}" for v in values))

    row("parameters", "params", ",d")
    row("parameters under weight decay", "decayed_params", ",d")
    row("step time, median (ms)", "median_step_seconds", ".1f", 1e3)
    row("examples/s", "examples_per_second", ",.1f")
    row("achieved model TFLOP/s", "achieved_flops_per_second", ".4f", 1e-12)
    row("MFU (%)", "mfu", ".2f", 100.0)
    row("loss of the first step", "first_loss", ".4f")
    if "jclip_over_openclip" in report:
        ratio = report["jclip_over_openclip"]
        lines.append(f"jclip / OpenCLIP: examples/s x{ratio['examples_per_second']:.3f}, step time "
                     f"x{ratio['step_seconds']:.3f}; parameter counts equal: {ratio['params_equal']}")
    flops = report["flops"]
    lines += ["", f"model FLOPs per step (analytic, 3 x forward): {flops['model_flops_per_step']:.4g}"]
    if "xla_flops_per_step" in flops:
        lines.append(f"XLA FLOPs per step (cost_analysis):         {flops['xla_flops_per_step']:.4g} "
                     f"(XLA / model = {flops['xla_over_model']:.3f})")
    peak = report["peak"]
    if peak:
        lines.append(f"peak: {peak['flops_per_second'] / 1e12:.4g} TFLOP/s per device "
                     f"({peak['devices_flops_per_second'] / 1e12:.4g} for the step), {peak['source']}")
    else:
        lines.append("peak: unknown, MFU omitted")
    if "jclip" in report:
        memory = report["jclip"]["memory"]
        lines.append(f"jclip memory: device allocator peak {_gib(memory['device_peak_bytes_in_use'])}; "
                     f"XLA's estimate per device {_gib(memory['xla_estimated_peak_bytes_per_device'])}; "
                     f"process max RSS {_gib(memory['process_max_rss_bytes'])}")
        lines.append(f"jclip compile: {report['jclip']['compile_seconds']:.1f} s")
    if "matmul_floor" in report:
        lines += _format_floor(report["matmul_floor"])
    if "openclip" in report:
        memory = report["openclip"]["memory"]
        runtime = report["openclip"]["runtime"]
        lines.append(f"OpenCLIP: open_clip {runtime['open_clip']}, torch {runtime['torch']} on {runtime['device']}, "
                     f"{runtime['torch_threads']} threads; CUDA peak allocated "
                     f"{_gib(memory['device_peak_memory_allocated_bytes'])}")
    lines += [f"note: {note}" for note in report["notes"] if note]
    return "\n".join(lines)


def _format_floor(floor: dict[str, Any], slowest: int = 5) -> list[str]:
    """The matmul floor's summary and its slowest shapes."""
    lines = [f"matmul floor: {floor['matmuls']} matmuls ({floor['distinct_shapes']} shapes, "
             f"{floor['flops']:.4g} FLOPs) timed alone take {floor['seconds'] * 1e3:.1f} ms, "
             f"{100 * floor['share_of_step']:.1f}% of jclip's step, at {floor['flops_per_second'] / 1e12:.4f} TFLOP/s"]
    if floor["mfu_bound"] is not None:
        lines.append(f"  = {100 * floor['rate_over_peak']:.1f}% of the peak: with every other operation free, the "
                     f"step's MFU would be at most {100 * floor['mfu_bound']:.1f}%")
    lines.append("  slowest in total (count x ms each, TFLOP/s):")
    for item in floor["by_shape"][:slowest]:
        lines.append(f"    {item['lhs']} x {item['rhs']} {item['dimension_numbers']}: {item['count']} x "
                     f"{item['seconds_each'] * 1e3:.2f} ms, {item['flops_per_second'] / 1e12:.3f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    from jclip.host_memory import keep_freed_memory

    keep_freed_memory()  # as jclip.main does, before the JAX backend starts
    args = _parse(argv)
    if args.openclip_python:
        # On a GPU, OpenCLIP's processes need memory beside this one: allocate on demand, not 75% up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = measure(args)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
