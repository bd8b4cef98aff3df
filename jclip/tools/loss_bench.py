"""Scaling benchmark of the loss terms: time and per-device memory of forward + backward, by global batch.

    python -m jclip.tools.loss_bench                          # 8 fake CPU devices, N = 1k .. 32k, d = 512
    python -m jclip.tools.loss_bench --batches=1024,4096 --terms=clip,rankclip --repeats=5

Each loss term (as configured in `TERMS_UNDER_TEST`) is jitted with its gradients with respect to the
embeddings and the logit scale, on a `data`-axis mesh with the global batch sharded over it. Memory is
XLA's compile-time analysis (temp bytes per device), so it is reported for every size; a size whose
buffers would not fit this machine's memory is compiled but not run (its time shows as "-"). The ratio
column compares with the plain CLIP loss at the same batch. The `rank_sorts` row is not a loss: it times the
four per-device argsorts of the rankclip term alone (forward), to show how much of that term they are.
shared/METHODS.md: every loss must keep
per-device memory O(n·N), never O(N²).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1024,2048,4096,8192,16384,32768", help="global batch sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (ignored on accelerators)")
    parser.add_argument("--terms", default=None, help="comma-separated subset of the terms (default: all)")
    parser.add_argument("--prototypes", type=int, default=4096, help="K of the nclip heads' logits")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    parser.add_argument("--memory_fraction", type=float, default=0.5, help="run only sizes whose buffers fit this fraction of RAM")
    parser.add_argument("--max_run_batch", type=int, default=None, help="larger batches are compiled (memory) but not timed")
    return parser.parse_args()


# name shown -> (loss terms config, needs a bias, needs prototype logits)
TERMS_UNDER_TEST = {
    "clip": ({"clip": {}}, False, False),
    "siglip": ({"siglip": {}}, True, False),
    "siglip_ring": ({"siglip": {"ring": True}}, True, False),
    "rankclip": ({"rankclip": {}}, False, False),
    "softclip": ({"softclip": {}}, False, False),
    "nclip": ({"nclip": {}}, False, True),
}
#: Not a loss: the four per-device argsorts of the rankclip term alone (forward), to show their share of it.
SORTS_ONLY = "rank_sorts"


def _rank_sorts_only(mesh, outputs):
    """Sorts each device's n×N blocks of S, Sᵀ, S_II and S_TT as the rankclip term does (random ties)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from jclip.losses.rank import descending_order
    from jclip.parallel import BATCH_MESH_AXES

    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.shape)

    def per_device(image_rows, text_rows, log_scale):
        image_all = jax.lax.all_gather(image_rows, axes, axis=0, tiled=True)
        text_all = jax.lax.all_gather(text_rows, axes, axis=0, tiled=True)
        columns = image_all.shape[0]
        mask = jnp.ones((columns,), bool)
        permutation = jax.random.permutation(jax.random.key(0), columns)
        total = jnp.zeros((), jnp.int32)
        for rows, others in ((image_rows, text_all), (text_rows, image_all), (image_rows, image_all), (text_rows, text_all)):
            order = descending_order(jnp.exp(log_scale) * rows @ others.T, mask, permutation)
            total = total + order[:, 0].sum()
        return jax.lax.psum(total, axes)

    spec = PartitionSpec(axes, None)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=PartitionSpec())
    return jax.jit(mapped).lower(outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"]).compile()


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def main() -> None:
    args = _parse()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from jclip import losses, parallel

    mesh = parallel.make_mesh({"data": -1})
    shards = parallel.batch_shards(mesh)
    batch_sharding = NamedSharding(mesh, parallel.batch_spec(2))
    replicated = NamedSharding(mesh, PartitionSpec())
    names = args.terms.split(",") if args.terms else [*TERMS_UNDER_TEST, SORTS_ONLY]
    unknown = [n for n in names if n not in TERMS_UNDER_TEST and n != SORTS_ONLY]
    if unknown:
        sys.exit(f"unknown terms {unknown}; known: {sorted(TERMS_UNDER_TEST) + [SORTS_ONLY]}")
    names = [n for n in names if n == SORTS_ONLY or next(iter(TERMS_UNDER_TEST[n][0])) in losses.TERMS]
    budget = args.memory_fraction * _available_bytes()
    print(f"{jax.device_count()} devices ({jax.devices()[0].platform}), d = {args.dim}, budget {budget / 2**30:.1f} GiB "
          f"for running; memory = XLA temp bytes per device, fwd + bwd")
    print(f"{'term':<12} {'N':>6} {'n/dev':>6} {'ms':>9} {'MiB/dev':>9} {'x clip ms':>9} {'x clip mem':>10}")
    rng = np.random.default_rng(0)
    clip_results: dict[int, tuple[float | None, float]] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        x = rng.normal(size=(batch, args.dim)).astype(np.float32)
        y = rng.normal(size=(batch, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        arrays = {"image_embeddings": jax.device_put(x, batch_sharding), "text_embeddings": jax.device_put(y, batch_sharding)}
        for name in names:
            terms, with_bias, with_prototypes = TERMS_UNDER_TEST.get(name, ({}, False, False))
            outputs = dict(arrays, logit_scale=jax.device_put(jnp.float32(np.log(1 / 0.07)), replicated))
            if with_bias:
                outputs["logit_bias"] = jax.device_put(jnp.float32(-10.0), replicated)
            if with_prototypes:
                h = np.tanh(rng.normal(size=(batch, args.prototypes))).astype(np.float32)
                outputs["image_prototype_logits"] = jax.device_put(h, batch_sharding)
                outputs["text_prototype_logits"] = jax.device_put(h[::-1].copy(), batch_sharding)
            if name == SORTS_ONLY:
                compiled = _rank_sorts_only(mesh, outputs)
                run = lambda compiled=compiled, outputs=outputs: compiled(  # noqa: E731
                    outputs["image_embeddings"], outputs["text_embeddings"], outputs["logit_scale"])
            else:
                state = losses.init_loss_state(terms, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in outputs.items()})
                ctx = losses.LossContext(mesh=mesh, step=1000, total_steps=2000, rng=jax.random.key(0), state=state)

                def loss(outs, ctx=ctx, terms=terms):
                    return losses.total_loss_with_state(outs, {}, ctx, terms)[0]

                compiled = jax.jit(jax.value_and_grad(loss)).lower(outputs).compile()
                run = lambda compiled=compiled, outputs=outputs: compiled(outputs)  # noqa: E731
            memory = compiled.memory_analysis()
            temp = float(memory.temp_size_in_bytes)
            live = (temp + memory.argument_size_in_bytes + memory.output_size_in_bytes) * jax.device_count()
            millis = None
            if live < budget and (args.max_run_batch is None or batch <= args.max_run_batch):
                jax.block_until_ready(run())
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    jax.block_until_ready(run())
                    times.append(time.perf_counter() - started)
                millis = 1000 * statistics.median(times)
            if name == "clip":
                clip_results[batch] = (millis, temp)
            base_ms, base_temp = clip_results.get(batch, (None, None))
            ratio_ms = f"{millis / base_ms:.2f}" if millis and base_ms else "-"
            ratio_mem = f"{temp / base_temp:.2f}" if base_temp else "-"
            shown_ms = f"{millis:.1f}" if millis is not None else "-"
            print(f"{name:<12} {batch:>6} {batch // shards:>6} {shown_ms:>9} {temp / 2**20:>9.3f} {ratio_ms:>9} {ratio_mem:>10}", flush=True)


if __name__ == "__main__":
    main()
