"""Methods compared on the same budget: identical model, data, steps and seeds, one table of mean ± std.

    python -m jclip.tools.compare --workdir=/tmp/compare                           # the six methods, seeds 0,1,2
    python -m jclip.tools.compare --workdir=/tmp/compare --methods=clip,rankclip --seeds=0,1,2,3 -- --config.total_steps=600
    python -m jclip.tools.compare --workdir=/tmp/fsc --methods=fscclip:variant=clip,fscclip:variant=negclip \
        --config_args=init=/tmp/pretrain,negatives=/tmp/negatives

A method is a config name under configs/, optionally with one config arg (`fscclip:variant=negclip`); each
(method, seed) trains `configs/<config>.py[:<arg>,<config_args>]` with `--config.seed=<seed>` in
`<workdir>/<method>/seed_<seed>` (`:` and `=` in the method become `-`; a finished run is not retrained:
rerunning resumes or does nothing), then the final evaluations of every run are gathered into
`<workdir>/comparison.md` (a Markdown table) and `comparison.json` (every run's numbers). `--config_args`
(comma-separated key=value) join every method's config arg; flags after `--` go to every run. The seed changes
the initialisation and the data order.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

import configs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS_DIR = pathlib.Path(configs.__file__).parent
DEFAULT_METHODS = ("clip", "siglip", "rankclip", "softclip", "nclip", "xclip")
#: column title -> metric in metrics.jsonl
COLUMNS = {
    "image→text R@1": "eval/retrieval/image_to_text_R@1",
    "text→image R@1": "eval/retrieval/text_to_image_R@1",
    "zero-shot top-1": "eval/zeroshot/top1",
    "hard negatives": "eval/compositional/accuracy",
    "attribute swap": "eval/compositional/accuracy/attribute_swap",
    "relation swap": "eval/compositional/accuracy/relation_swap",
    "object replace": "eval/compositional/accuracy/object_replace",
}


def final_metrics(workdir: pathlib.Path) -> dict[str, float]:
    """The last value of every metric in a run's metrics.jsonl."""
    values: dict[str, float] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        values.update(json.loads(line))
    return values


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown: one row per method, mean ± sample std over its seeds for every column."""
    header = "| method | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for method, runs in results.items():
        cells = [mean_std([run[key] for run in runs.values() if key in run]) for key in COLUMNS.values()]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def config_path(method: str) -> pathlib.Path:
    """configs/<config>.py of a method `<config>[:<arg>]`."""
    return CONFIGS_DIR / (method.partition(":")[0] + ".py")


def config_flag(method: str, config_args: str) -> str:
    """`--config=configs/<config>.py[:<args>]`: the method's own arg joined with the shared `config_args`."""
    args = ",".join(a for a in (method.partition(":")[2], config_args) if a)
    return f"--config={config_path(method)}" + (f":{args}" if args else "")


def run_dir(method: str) -> str:
    """The method's folder name under the workdir (`fscclip:variant=negclip` -> `fscclip-variant-negclip`)."""
    return method.replace(":", "-").replace("=", "-").replace("/", "-")


def run_one(method: str, seed: int, workdir: pathlib.Path, extra: list[str], config_args: str = "") -> None:
    command = [sys.executable, "-m", "jclip.main", config_flag(method, config_args),
               f"--workdir={workdir}", f"--config.seed={seed}", *extra]
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "compare.log", "a") as log:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed (exit {result.returncode}); see {workdir / 'compare.log'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="config names under configs/, each optionally with one arg: fscclip:variant=negclip")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config_args", default="", help="key=value,... added to every method's config arg")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    missing = [m for m in methods if not config_path(m).is_file()]
    if missing:
        raise SystemExit(f"no config for {missing} in {CONFIGS_DIR}")
    results: dict[str, dict[int, dict[str, float]]] = {}
    total, done, started = len(methods) * len(seeds), 0, time.perf_counter()
    for method in methods:
        for seed in seeds:
            workdir = args.workdir / run_dir(method) / f"seed_{seed}"
            print(f"[{done + 1}/{total}] {method} seed {seed} -> {workdir}", flush=True)
            run_one(method, seed, workdir, extra, args.config_args)
            done += 1
            results.setdefault(method, {})[seed] = final_metrics(workdir)
            elapsed = time.perf_counter() - started
            print(f"    done; {elapsed / 60:.1f} min so far, about {elapsed / done * (total - done) / 60:.1f} min to go", flush=True)
    markdown = table(results)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "comparison.md").write_text(markdown + "\n")
    (args.workdir / "comparison.json").write_text(json.dumps({"extra_flags": extra, "config_args": args.config_args,
                                                                    "runs": results}, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
