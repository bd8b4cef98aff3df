"""Speed and coverage of the negative generator on the embedded dataset's captions.

    python -m jclip.data.negatives --backend auto --captions 2000

Prints the backend, its set-up time, captions/s of `generate` (one call, cold caches) and, per kind, the share
of captions with at least one candidate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jclip.data.negatives import BACKENDS, KINDS, coverage, make_generator
from jclip.data.sources import scenes


def embedded_captions(n: int, seed: int = 0) -> list[str]:
    """Short captions of random scenes, as the embedded dataset writes them."""
    rng = np.random.default_rng(seed)
    return [scenes.short_caption(scenes.sample_scene(rng), rng) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-per-kind", type=int, default=16)
    parser.add_argument("--examples", type=int, default=3, help="captions whose pools are printed")
    args = parser.parse_args()

    start = time.perf_counter()
    generator = make_generator(args.backend, seed=args.seed, max_per_kind=args.max_per_kind)
    set_up = time.perf_counter() - start
    captions = embedded_captions(args.captions, args.seed)
    start = time.perf_counter()
    results = generator.generate(captions)
    seconds = time.perf_counter() - start

    print(f"backend: {generator.backend} (set-up {set_up:.1f} s)")
    rate = len(captions) / seconds
    print(f"{len(captions)} captions ({len(set(captions))} distinct) in {seconds:.2f} s: {rate:.0f} captions/s")
    shares = coverage(results)
    print("coverage: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
    sizes = {k: np.mean([len(r.pools[k]) for r in results]) for k in KINDS}
    print("mean pool size: " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    for result in results[: args.examples]:
        print(result.caption)
        for kind in KINDS:
            print(f"  {kind}: {result.pools[kind][:3]}")


if __name__ == "__main__":
    main()
