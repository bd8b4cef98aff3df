"""The improved-captions ablation ladder (Stone et al. 2412.15396) on one budget: five rungs, several seeds.

    python -m jclip.tools.ladder --workdir=/tmp/ladder --negatives=/tmp/negatives
    python -m jclip.tools.ladder --workdir=/tmp/ladder --negatives=/tmp/negatives --seeds=0 --steps=300 --batch=64

Rungs (`configs/dense_captions.py:rung=N`): 1 scratch text tower + alt-text; 2 scratch tower + dense captions;
3 pretrained tower + dense captions; 4 + sentence sampling; 5 rung 4 fine-tuned on hard negatives (NegCLIP on
alt-text with `make_negatives` pools, `--finetune_steps`). Rungs 1-4 train `--steps` at `--batch`; each
(rung, seed) runs in `<workdir>/rung_<N>/seed_<S>` through `jclip.tools.compare.run_one` (a finished run is not
retrained), rung 5 starting from the same seed's rung 4. The table (`ladder.md`, every run in `ladder.json`)
gives per rung the mean ± std of compositional accuracy per category, DOCCI-style retrieval of the dense
descriptions (one long text per image, R@1/5/10 both ways), short-caption retrieval and zero-shot accuracy,
beside the paper's DOCCI text->image R@1. Flags after `--` go to every run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from jclip.tools.compare import final_metrics, mean_std, run_one

RUNGS = {
    1: "scratch tower, alt-text",
    2: "scratch tower, dense captions",
    3: "pretrained tower, dense captions",
    4: "+ sentence sampling",
    5: "+ hard-negative fine-tune",
}
#: The paper's DOCCI text->image R@1 per rung (Stone et al., ablation table); rung 5 lowers it, no number given.
PAPER_DOCCI_T2I_R1 = {1: "53.5", 2: "75.6", 3: "91.6", 4: "93.0", 5: "lower"}
COLUMNS = {
    "relation swap": "eval/compositional/accuracy/relation_swap",
    "attribute swap": "eval/compositional/accuracy/attribute_swap",
    "object replace": "eval/compositional/accuracy/object_replace",
    **{f"dense t→i R@{k}": f"eval/dense_retrieval/text_to_image_R@{k}" for k in (1, 5, 10)},
    **{f"dense i→t R@{k}": f"eval/dense_retrieval/image_to_text_R@{k}" for k in (1, 5, 10)},
    "short t→i R@1": "eval/retrieval/text_to_image_R@1",
    "short i→t R@1": "eval/retrieval/image_to_text_R@1",
    "zero-shot top-1": "eval/zeroshot/top1",
}


def table(results: dict[int, dict[int, dict[str, float]]]) -> str:
    """Markdown: one row per rung, mean ± sample std over its seeds, and the paper's DOCCI t→i R@1 (in %)."""
    lines = ["| rung | seeds | " + " | ".join(COLUMNS) + " | paper: DOCCI t→i R@1 |",
             "|" + "---|" * (len(COLUMNS) + 3)]
    for rung, runs in sorted(results.items()):
        cells = [mean_std([run[key] for run in runs.values() if key in run]) for key in COLUMNS.values()]
        lines.append(f"| {rung}. {RUNGS[rung]} | {len(runs)} | " + " | ".join(cells) + f" | {PAPER_DOCCI_T2I_R1[rung]} |")
    return "\n".join(lines)


def config_args(rung: int, seed: int, args: argparse.Namespace) -> str:
    """The config args of one run besides `rung=N` (the budget; rung 5's negatives and starting point)."""
    if rung == 5:
        start = args.workdir / "rung_4" / f"seed_{seed}"
        return f"steps={args.finetune_steps},batch={args.batch},negatives={args.negatives},init={start}"
    return f"steps={args.steps},batch={args.batch}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--negatives", default="", help="a make_negatives folder (needed for rung 5)")
    parser.add_argument("--rungs", default="1,2,3,4,5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="training steps of rungs 1-4")
    parser.add_argument("--finetune_steps", type=int, default=60, help="training steps of rung 5")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rungs = [int(r) for r in args.rungs.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    unknown = sorted(set(rungs) - set(RUNGS))
    if unknown:
        raise SystemExit(f"unknown rungs {unknown}; the ladder has {sorted(RUNGS)}")
    if 5 in rungs and not args.negatives:
        raise SystemExit("rung 5 needs --negatives=DIR (python -m jclip.make_negatives --config=configs/dense_captions.py:rung=5 ...)")
    results: dict[int, dict[int, dict[str, float]]] = {}
    total, done, started = len(rungs) * len(seeds), 0, time.perf_counter()
    for rung in rungs:
        for seed in seeds:
            workdir = args.workdir / f"rung_{rung}" / f"seed_{seed}"
            print(f"[{done + 1}/{total}] rung {rung} ({RUNGS[rung]}) seed {seed} -> {workdir}", flush=True)
            if rung == 5 and not (args.workdir / "rung_4" / f"seed_{seed}" / "checkpoints").is_dir():
                raise SystemExit(f"rung 5 seed {seed} fine-tunes rung 4 seed {seed}, which has not run: add 4 to --rungs")
            run_one(f"dense_captions:rung={rung}", seed, workdir, extra, config_args(rung, seed, args))
            done += 1
            results.setdefault(rung, {})[seed] = final_metrics(workdir)
            elapsed = time.perf_counter() - started
            print(f"    done; {elapsed / 60:.1f} min so far, about {elapsed / done * (total - done) / 60:.1f} min to go",
                  flush=True)
    markdown = table(results)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "ladder.md").write_text(markdown + "\n")
    (args.workdir / "ladder.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "extra_flags": extra, "runs": results}, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
