"""Compile-time benchmark of `model.scan_layers`: the train step of a preset lowered and compiled (forward +
backward + AdamW) with its blocks one by one and stacked under `jax.lax.scan`, with and without remat.

    python -m jclip.tools.compile_bench                      # L/14, batch 8, one CPU device
    python -m jclip.tools.compile_bench --preset=g/14 --variants=scan,scan+remat

Nothing runs and no weight is allocated: each variant goes through `jclip.compile_only.compile_report` (the
real train step on abstract inputs). Printed per variant: lowering and compile seconds, XLA's temporary bytes
and the per-device FLOPs it counts (a scanned loop body counts once). Compile time is what `scan_layers` is
for; the backend compiles for the machine it runs on (XLA CPU here unless an accelerator is present).
"""

from __future__ import annotations

import argparse

VARIANTS = {"loop": (False, False), "loop+remat": (False, True), "scan": (True, False), "scan+remat": (True, True)}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="L/14")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the compiled step")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    parser.add_argument("--variants", default="loop,scan,scan+remat", help=f"comma-separated of {list(VARIANTS)}")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    from configs import clip, common
    from jclip.compile_only import compile_report

    print(f"preset {args.preset}, batch {args.batch}, dtype {args.dtype}")
    print(f"{'variant':<12} {'lower s':>8} {'compile s':>10} {'temp GiB':>9} {'XLA GFLOPs':>11}")
    for name in args.variants.split(","):
        scan, remat = VARIANTS[name]
        config = clip.get_config(f"batch={args.batch}")
        config.model = common.model_config(args.preset, args.dtype)
        config.model.scan_layers, config.model.remat = scan, remat
        config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
        config.evals = {}
        report = compile_report(config)
        print(f"{name:<12} {report.lower_seconds:>8.1f} {report.compile_seconds:>10.1f} "
              f"{report.memory['temp_size_in_bytes'] / 2 ** 30:>9.2f} {report.xla_flops_per_device / 1e9:>11.0f}",
              flush=True)


if __name__ == "__main__":
    main()
