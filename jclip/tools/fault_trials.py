"""Kill trials: SIGKILL a micro training run at seeded random moments, rerun it after each kill, and check that the
finished run's losses equal an uninterrupted run's, step for step, and that no checked checkpoint was lost.

    python -m jclip.tools.fault_trials --trials 5 --kills 3 --seed 0 --workdir /tmp/fault_trials
    python -m jclip.tools.fault_trials --trials 2 --kills 3 --steps 60 --workdir /tmp/ft --data_dir /tmp/tfds

Every run is the same `python -m jclip.main` command: configs/clip.py with the micro model
(jclip.tools.micro_run) on the `small` embedded dataset (built in `--data_dir` on first use, by default
`<workdir>/tfds`), on one CPU device, a checkpoint every `--checkpoint_every` steps (keep `--keep`) and every
evaluation every `--eval_every` steps. A resumed run trains exactly the batches it would have (the resume tests'
guarantee), so its losses must equal the reference's bit for bit. First an uninterrupted reference run, then
`--trials` trials in `<workdir>/trial_<i>`; each trial's run is killed `--kills` times, each kill of a kind taken in
rotation over all the trials' kills:
  step: a seeded delay, within one train step's time, after the run prints `step N/T`;
  save: a seeded delay, within an Orbax save's time, after its `<N>.orbax-checkpoint-tmp` folder appears;
  eval: a seeded delay, within that evaluation's time, after the run prints `evaluating <name> at step N`.
The target step N is drawn among the steps ahead of where the run started, from the first part of them so that
the later kills of the trial find steps left; the delays are scaled to the reference run's timings. Each kill is
classified by what the run was doing when it died: the last line it printed (a step, an evaluation, start-up, the
final step) and whether a save folder was left unfinished; a kill that missed its phase counts as what it hit.

The table and `<workdir>/fault_trials.json` give the kills by kind (injected, landed in the intended phase, what
they hit), the reruns and resumes, steps lost (missing from the finished run's metrics.jsonl) and steps that differ
from the reference, steps trained twice (redone after a resume: expected), metrics lines that are not JSON,
checkpoints lost (a step that had been checked, i.e. had its jclip_manifest.json, and later was gone without being
pruned by `keep`, or was moved aside as damaged), `.damaged-*` folders of any step, the exit codes of the runs and
the wall time. The tool exits 1 when a trial lost or changed a step, has a metrics line that is not JSON, lost a
checkpoint, or had a run end other than by its kill (-9) or, the last, with status 0.

A persistent XLA compilation cache in `<workdir>/jax_cache` (off with `--no_compilation_cache`) cuts each
restart's compile time; it does not change what is computed (the reference populates it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

import configs
from jclip.checkpoint import DAMAGED, MANIFEST, UNFINISHED
from jclip.tools.micro_run import compilation_cache_env, cpu_env, micro_run_flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILE = pathlib.Path(configs.__file__).parent / "clip.py"
KINDS = ("step", "save", "eval")
#: The evaluations of configs/clip.py, all run every `eval_every` steps in the trials.
EVALUATIONS = ("retrieval", "zeroshot", "compositional")

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")
EVAL_START = re.compile(r"^evaluating (\S+) at step (\d+)$")
EVAL_DONE = re.compile(r"^eval (\S+) @ step (\d+):")
START_LINE = re.compile(r", steps (\d+)->(\d+), workdir ")
RESUMED_LINE = re.compile(r"^resumed from .* at step (\d+)$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the trials run: how many, how many kills each, the seed, and the micro run's schedule."""

    workdir: pathlib.Path
    trials: int = 5
    kills: int = 3
    seed: int = 0
    steps: int = 60
    checkpoint_every: int = 10
    keep: int = 3
    eval_every: int = 15  # not a multiple of checkpoint_every: some evaluations run with no save in flight
    data_dir: pathlib.Path | None = None
    compilation_cache: bool = True
    run_timeout: float = 600.0

    def flags(self) -> list[str]:
        """The `jclip.main` flags of every run (reference and trials alike)."""
        evals = {f"evals.{name}.every": self.eval_every for name in EVALUATIONS}
        data_dir = self.data_dir or self.workdir / "tfds"
        return micro_run_flags(data_dir, total_steps=self.steps, checkpoint_every=self.checkpoint_every,
                               keep_checkpoints=self.keep, **evals)

    def env(self) -> dict[str, str]:
        """One CPU device per run (the losses then depend on nothing else); the shared compilation cache."""
        env = cpu_env(1)
        for name in ("JCLIP_COORDINATOR_ADDRESS", "JCLIP_NUM_PROCESSES", "JCLIP_PROCESS_ID"):
            env.pop(name, None)
        if self.compilation_cache:
            env.update(compilation_cache_env(self.workdir / "jax_cache"))
        return env

    def command(self, workdir: pathlib.Path) -> list[str]:
        return [sys.executable, "-m", "jclip.main", f"--config={CONFIG_FILE}", f"--workdir={workdir}", *self.flags()]


class Run:
    """One `jclip.main` process; a thread reads its output (stdout and stderr) into `lines` with arrival times
    and into a log file."""

    def __init__(self, settings: Settings, workdir: pathlib.Path, log_path: pathlib.Path):
        self.started = time.monotonic()
        self.process = subprocess.Popen(settings.command(workdir), cwd=REPO_ROOT, env=settings.env(), text=True,
                                        errors="replace", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self._ended = False
        self._changed = threading.Condition()
        self._log = open(log_path, "w", encoding="utf-8")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._log.write(line + "\n")
            with self._changed:
                self.lines.append((time.monotonic(), line))
                self._changed.notify_all()
        self._log.close()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, test: Callable[[str], object], timeout: float) -> object | None:
        """The first truthy `test(line)` over the output so far and to come; None if the output ended first."""
        deadline, index = time.monotonic() + timeout, 0
        with self._changed:
            while True:
                for _, line in self.lines[index:]:
                    index += 1
                    if found := test(line):
                        return found
                if self._ended or time.monotonic() > deadline:
                    return None
                self._changed.wait(timeout=0.5)

    def start_step(self, timeout: float) -> int | None:
        """The step the run starts from (its `steps A->T` line); None if it ended before printing it."""
        found = self.wait_for(START_LINE.search, timeout)
        return None if found is None else int(found.group(1))

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> int:
        """SIGKILLs the process (if still running) and returns its exit code once its output is read."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        return self.finish(timeout=60)

    def finish(self, timeout: float) -> int:
        """Waits for the process to end (killing it after `timeout` s) and its output to be read; its exit code."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self._reader.join(timeout=60)
        return code

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def last_event(self) -> re.Match | None:
        """The last line that says where the loop was: a step, an evaluation's start or end, the start line."""
        for _, line in reversed(self.lines):
            for pattern in (STEP_LINE, EVAL_START, EVAL_DONE, RESUMED_LINE):
                if match := pattern.match(line):
                    return match
            if match := START_LINE.search(line):
                return match
        return None


class CheckpointWatch:
    """Polls a run's checkpoints folder on a thread: every step seen with its manifest (checked), and how long
    each unfinished save folder was seen for (the reference's save time)."""

    def __init__(self, directory: pathlib.Path, interval: float = 0.01):
        self.directory = directory
        self.interval = interval
        self.checked: set[int] = set()
        self.save_seconds: list[float] = []
        self._unfinished: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> CheckpointWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.look()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.look()

    def look(self) -> None:
        names, now = folder_names(self.directory), time.monotonic()
        for name in names:
            if name.isdigit() and int(name) not in self.checked and (self.directory / name / MANIFEST).is_file():
                self.checked.add(int(name))
            if UNFINISHED in name:
                self._unfinished.setdefault(name, now)
        for name, since in list(self._unfinished.items()):
            if name not in names:
                self.save_seconds.append(now - since)
                del self._unfinished[name]


def folder_names(directory: pathlib.Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@dataclasses.dataclass(frozen=True)
class Timings:
    """The reference run's median times, which scale the kills' random delays (`evals` in the loop's order)."""

    step: float
    save: float
    evals: dict[str, float]

    @classmethod
    def measure(cls, run: Run, save_seconds: list[float], settings: Settings) -> Timings:
        steps: dict[int, float] = {}
        started: dict[tuple[str, int], float] = {}
        evals: dict[str, list[float]] = {}
        for at, line in run.lines:
            if match := STEP_LINE.match(line):
                steps[int(match.group(1))] = at
            elif match := EVAL_START.match(line):
                started[match.group(1), int(match.group(2))] = at
            elif (match := EVAL_DONE.match(line)) and (match.group(1), int(match.group(2))) in started:
                evals.setdefault(match.group(1), []).append(at - started[match.group(1), int(match.group(2))])
        # A plain step: its predecessor neither evaluated nor saved; the first step (compilation) left out.
        gaps = [steps[s] - steps[s - 1] for s in steps if s - 1 in steps and s > 2
                and (s - 1) % settings.eval_every and (s - 1) % settings.checkpoint_every]
        return cls(step=statistics.median(gaps) if gaps else 0.05,
                   save=statistics.median(save_seconds) if save_seconds else 0.1,
                   evals={name: statistics.median(times) for name, times in evals.items()})


@dataclasses.dataclass
class Kill:
    """One kill: what it aimed at, and what the run was doing when it died."""

    kind: str
    target: int
    injected: bool
    hit: list[str] = dataclasses.field(default_factory=list)
    started_at: int | None = None
    last_step: int | None = None
    seconds: float = 0.0
    detail: str = ""

    @property
    def landed(self) -> bool:
        return self.injected and self.kind in self.hit


@dataclasses.dataclass
class Trial:
    """One trial: its kills, every run's exit code and start step, and how the finished run compares."""

    index: int
    kills: list[Kill] = dataclasses.field(default_factory=list)
    exit_codes: list[int] = dataclasses.field(default_factory=list)
    started_at: list[int | None] = dataclasses.field(default_factory=list)
    steps_lost: list[int] = dataclasses.field(default_factory=list)
    steps_differ: list[int] = dataclasses.field(default_factory=list)
    steps_redone: int = 0
    bad_metrics_lines: int = 0
    checkpoints_lost: list[int] = dataclasses.field(default_factory=list)
    damaged_folders: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def reruns(self) -> int:
        return max(len(self.started_at) - 1, 0)

    @property
    def resumes(self) -> int:
        """The reruns that restored a checkpoint (a rerun killed before any save starts from step 0)."""
        return sum(1 for step in self.started_at[1:] if step)

    @property
    def runs_ok(self) -> bool:
        """Every killed run died of its kill (-9), and the last run finished with status 0."""
        killed = [kill for kill in self.kills if kill.injected]
        return (len(self.exit_codes) == len(killed) + 1 and self.exit_codes[-1] == 0
                and all(code == -signal.SIGKILL for code in self.exit_codes[:-1]))

    @property
    def ok(self) -> bool:
        return self.runs_ok and not (self.steps_lost or self.steps_differ or self.checkpoints_lost
                                     or self.bad_metrics_lines)


def read_losses(workdir: pathlib.Path) -> tuple[dict[int, float], int, int]:
    """step -> loss of a workdir's metrics.jsonl (a step's last line wins, as after a resume), how many loss lines
    repeat a step (steps trained again after a resume), and how many lines are not JSON (a record cut by a kill)."""
    losses, lines, bad = {}, 0, 0
    path = workdir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
            lines += 1
    return losses, lines - len(losses), bad


def observe(run: Run, checkpoints: pathlib.Path, total: int, evaluations: tuple[str, ...]) -> list[str]:
    """What a killed run was doing: `save` if a save folder was left unfinished, and where its loop was by the
    last line it printed: `eval` (an evaluation had started, and it or the next of `evaluations`, in the loop's
    order, had not ended), `step` (a train step: after a step line, or after the step's last evaluation), `final`
    (past the last step) or `startup` (no step yet)."""
    hit = ["save"] if any(UNFINISHED in name for name in folder_names(checkpoints)) else []
    event = run.last_event()
    if event is None or event.re in (START_LINE, RESUMED_LINE):
        hit.append("startup")
    elif event.re is EVAL_START:
        hit.append("eval")
    elif event.re is EVAL_DONE:
        last_of_step = event.group(1) == evaluations[-1]
        hit.append("eval" if not last_of_step else "step" if int(event.group(2)) < total else "final")
    else:
        hit.append("step" if int(event.group(1)) < total else "final")
    return hit


def early_choice(candidates: list[int], kills_left: int, rng: np.random.Generator) -> int:
    """A step among the first 1/kills_left of `candidates`, so that the trial's later kills find steps left."""
    return int(rng.choice(candidates[: max(1, math.ceil(len(candidates) / kills_left))]))


class Killer:
    """Kills a run at a seeded moment of one kind; `kill` returns the Kill, with injected False when the run ended
    (or had no step left to aim at) first."""

    def __init__(self, settings: Settings, timings: Timings, rng: np.random.Generator):
        self.settings, self.timings, self.rng = settings, timings, rng

    def candidates(self, kind: str, start: int) -> list[int]:
        """The steps a kill of `kind` may aim at in a run that starts from `start`: a step that neither evaluates
        nor ends the run (a train step follows its line), a checkpoint step, an evaluation step."""
        total, every = self.settings.steps, self.settings.eval_every
        if kind == "step":
            return [s for s in range(start + 1, total) if s % every]
        every = self.settings.checkpoint_every if kind == "save" else every
        return [s for s in range(start + 1, total + 1) if s % every == 0 or s == total]

    def kill(self, kind: str, run: Run, checkpoints: pathlib.Path, kills_left: int) -> Kill:
        start = run.start_step(self.settings.run_timeout)
        if start is None:
            return Kill(kind, target=-1, injected=False, detail="the run ended before its start line")
        candidates = self.candidates(kind, start)
        if not candidates:
            return Kill(kind, target=-1, injected=False, started_at=start, detail=f"no step to aim at after {start}")
        target = early_choice(candidates, kills_left, self.rng)
        aim = {"step": self._in_step, "save": self._in_save, "eval": self._in_eval}[kind]
        kill = aim(run, checkpoints, target)
        kill.started_at = start
        if kill.injected:
            kill.hit = observe(run, checkpoints, self.settings.steps, tuple(self.timings.evals))
            steps = [int(m.group(1)) for _, line in run.lines if (m := STEP_LINE.match(line))]
            kill.last_step = max(steps) if steps else None
        kill.seconds = run.seconds()
        return kill

    def _sleep_then_kill(self, run: Run, delay: float) -> bool:
        time.sleep(delay)
        if not run.alive():
            return False
        run.kill()
        return True

    def _in_step(self, run: Run, checkpoints: pathlib.Path, target: int) -> Kill:
        """After `step N/T`, within the next step's time."""
        delay = float(self.rng.uniform(0, 0.9 * self.timings.step))
        if run.wait_for(lambda line: line.startswith(f"step {target}/"), self.settings.run_timeout) is None:
            return Kill("step", target, injected=False, detail="the run ended first")
        return Kill("step", target, injected=self._sleep_then_kill(run, delay), detail=f"delay {delay * 1e3:.0f} ms")

    def _in_save(self, run: Run, checkpoints: pathlib.Path, target: int) -> Kill:
        """Once the save of checkpoint step N has an unfinished folder (looked for every ms), within the
        reference's save time; a save that finished between two looks is killed at once (it counts as what it hit)."""
        delay = float(self.rng.uniform(0, 0.8 * self.timings.save))
        prefix = f"{target}{UNFINISHED}"
        deadline = time.monotonic() + self.settings.run_timeout
        while run.alive() and time.monotonic() < deadline:
            names = folder_names(checkpoints)
            if any(name.startswith(prefix) for name in names):
                break
            if str(target) in names:
                delay = 0.0
                break
            time.sleep(0.001)
        else:
            return Kill("save", target, injected=False, detail="the run ended first")
        return Kill("save", target, injected=self._sleep_then_kill(run, delay), detail=f"delay {delay * 1e3:.0f} ms")

    def _in_eval(self, run: Run, checkpoints: pathlib.Path, target: int) -> Kill:
        """After `evaluating <name> at step N` (a random evaluation), within the reference's time for it."""
        name = str(self.rng.choice(EVALUATIONS))
        delay = float(self.rng.uniform(0, 0.8 * self.timings.evals.get(name, 0.05)))
        marker = f"evaluating {name} at step {target}"
        if run.wait_for(lambda line: line == marker, self.settings.run_timeout) is None:
            return Kill("eval", target, injected=False, detail="the run ended first")
        return Kill("eval", target, injected=self._sleep_then_kill(run, delay),
                    detail=f"{name}, delay {delay * 1e3:.0f} ms")


def run_reference(settings: Settings) -> tuple[dict[int, float], Timings, float]:
    """The uninterrupted run: its losses (every step), the timings that scale the kills, its seconds."""
    workdir = settings.workdir / "reference"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    with CheckpointWatch(workdir / "checkpoints", interval=0.002) as watch:
        run = Run(settings, workdir, settings.workdir / "reference.log")
        code = run.finish(settings.run_timeout)
    losses, _, _ = read_losses(workdir)
    if code != 0 or sorted(losses) != list(range(1, settings.steps + 1)):
        raise RuntimeError(f"the reference run failed (exit status {code}); see {settings.workdir / 'reference.log'}")
    return losses, Timings.measure(run, watch.save_seconds, settings), run.seconds()


def lost_checkpoints(checked: set[int], directory: pathlib.Path, keep: int) -> tuple[list[int], list[str]]:
    """The checked steps that are gone without `keep` newer steps having pruned them, or that were moved aside as
    damaged; and every `.damaged-*` folder."""
    names = folder_names(directory)
    present = {int(name) for name in names if name.isdigit()}
    damaged = sorted(name for name in names if DAMAGED in name)
    moved = {int(name.split(DAMAGED)[0]) for name in damaged}
    lost = {step for step in checked if step not in present and sum(s > step for s in present) < keep}
    return sorted(lost | (moved & checked)), damaged


def run_trial(index: int, settings: Settings, reference: dict[int, float], timings: Timings, log=print) -> Trial:
    """One trial: the run killed `settings.kills` times (kinds in rotation), rerun after each, compared at the end."""
    workdir = settings.workdir / f"trial_{index}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    checkpoints = workdir / "checkpoints"
    killer = Killer(settings, timings, np.random.default_rng([settings.seed, index]))
    trial, started = Trial(index), time.monotonic()
    with CheckpointWatch(checkpoints) as watch:
        for number in range(settings.kills + 1):
            run = Run(settings, workdir, workdir / f"run_{number}.log")
            if number == settings.kills:  # the last run goes to the end
                trial.exit_codes.append(run.finish(settings.run_timeout))
                trial.started_at.append(run.start_step(0))
                break
            kind = KINDS[(index * settings.kills + number) % len(KINDS)]
            kill = killer.kill(kind, run, checkpoints, settings.kills - number)
            trial.kills.append(kill)
            trial.exit_codes.append(run.kill() if kill.injected else run.finish(settings.run_timeout))
            trial.started_at.append(kill.started_at)
            log(f"  trial {index} kill {number + 1}: {describe_kill(kill)}")
            if not kill.injected:  # the run ended by itself: nothing left to kill
                break
    losses, trial.steps_redone, trial.bad_metrics_lines = read_losses(workdir)
    trial.steps_lost = [step for step in reference if step not in losses]
    trial.steps_differ = [step for step in reference if step in losses and losses[step] != reference[step]]
    trial.checkpoints_lost, trial.damaged_folders = lost_checkpoints(watch.checked, checkpoints, settings.keep)
    trial.seconds = time.monotonic() - started
    return trial


def describe_kill(kill: Kill) -> str:
    if not kill.injected:
        return f"{kill.kind} at step {kill.target}: not injected ({kill.detail})"
    return (f"{kill.kind} at step {kill.target} ({kill.detail}) hit {'+'.join(kill.hit)}; run started at step "
            f"{kill.started_at}, last step line {kill.last_step}, {kill.seconds:.1f} s in")


@dataclasses.dataclass
class Report:
    settings: Settings
    reference_seconds: float
    timings: Timings
    trials: list[Trial]
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return all(trial.ok for trial in self.trials)

    def kills_by_kind(self) -> dict[str, dict]:
        """Per intended kind: injected, landed in the intended phase, and what the injected kills hit."""
        kills = [kill for trial in self.trials for kill in trial.kills]
        summary = {}
        for kind in KINDS:
            mine = [kill for kill in kills if kill.kind == kind]
            hits: dict[str, int] = {}
            for kill in mine:
                if kill.injected:
                    hits["+".join(kill.hit)] = hits.get("+".join(kill.hit), 0) + 1
            summary[kind] = {"aimed": len(mine), "injected": sum(k.injected for k in mine),
                             "landed": sum(k.landed for k in mine), "hit": dict(sorted(hits.items()))}
        return summary

    def to_json(self) -> dict:
        trials = self.trials
        return {
            "settings": {**{k: v for k, v in dataclasses.asdict(self.settings).items() if k != "workdir"},
                         "workdir": str(self.settings.workdir), "data_dir": str(self.settings.data_dir or "")},
            "trials": len(trials),
            "kills": self.kills_by_kind(),
            "reruns": sum(t.reruns for t in trials),
            "resumes": sum(t.resumes for t in trials),
            "steps_lost": sum(len(t.steps_lost) for t in trials),
            "steps_differ": sum(len(t.steps_differ) for t in trials),
            "steps_redone": sum(t.steps_redone for t in trials),
            "bad_metrics_lines": sum(t.bad_metrics_lines for t in trials),
            "checkpoints_lost": sum(len(t.checkpoints_lost) for t in trials),
            "damaged_folders": sum(len(t.damaged_folders) for t in trials),
            "runs_ok": all(t.runs_ok for t in trials),
            "ok": self.ok,
            "reference_seconds": round(self.reference_seconds, 1),
            "timings": dataclasses.asdict(self.timings),
            "wall_seconds": round(self.wall_seconds, 1),
            "per_trial": [{**dataclasses.asdict(t), "reruns": t.reruns, "resumes": t.resumes, "runs_ok": t.runs_ok,
                           "kills": [{**dataclasses.asdict(k), "landed": k.landed} for k in t.kills]}
                          for t in trials],
        }

    def table(self) -> str:
        """The settings, the kills by kind, one row per trial, and the totals (Markdown tables)."""
        s, t = self.settings, self.timings
        heading = (f"fault trials: {len(self.trials)} trials x {s.kills} kills, seed {s.seed}; {s.steps} steps, "
                   f"checkpoint every {s.checkpoint_every} (keep {s.keep}), evaluations every {s.eval_every}; "
                   f"reference run {self.reference_seconds:.1f} s (step {t.step * 1e3:.0f} ms, "
                   f"save {t.save * 1e3:.0f} ms)")
        return "\n\n".join([heading, self._kinds_table(), self._trials_table(), self._totals()])

    def _kinds_table(self) -> str:
        lines = ["| kill kind | aimed | injected | landed | what the injected kills hit |", "|---|---|---|---|---|"]
        for kind, row in self.kills_by_kind().items():
            hits = ", ".join(f"{name} {count}" for name, count in row["hit"].items()) or "-"
            lines.append(f"| {kind} | {row['aimed']} | {row['injected']} | {row['landed']} | {hits} |")
        return "\n".join(lines)

    def _trials_table(self) -> str:
        lines = ["| trial | kills (kind@step: hit) | started at | exit codes | steps lost | steps differ | redone | "
                 "checkpoints lost | damaged | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for t in self.trials:
            kills = ", ".join(f"{k.kind}@{k.target}: {'+'.join(k.hit) if k.injected else 'missed'}" for k in t.kills)
            lines.append(f"| {t.index} | {kills} | {','.join(str(x) for x in t.started_at)} | "
                         f"{','.join(str(c) for c in t.exit_codes)} | {len(t.steps_lost)} | {len(t.steps_differ)} | "
                         f"{t.steps_redone} | {len(t.checkpoints_lost)} | {len(t.damaged_folders)} | {t.seconds:.0f} |")
        return "\n".join(lines)

    def _totals(self) -> str:
        n = self.to_json()
        return (f"reruns {n['reruns']} ({n['resumes']} resumed from a checkpoint), steps lost {n['steps_lost']}, "
                f"steps that differ {n['steps_differ']}, steps redone {n['steps_redone']}, metrics lines that are "
                f"not JSON {n['bad_metrics_lines']}, checkpoints lost "
                f"{n['checkpoints_lost']}, damaged folders {n['damaged_folders']}, every run ended as expected: "
                f"{n['runs_ok']}; wall time {self.wall_seconds:.0f} s; " + ("PASS" if self.ok else "FAIL"))


def run_trials(settings: Settings, log=print) -> Report:
    """The reference run, then every trial; the report (also written to `<workdir>/fault_trials.json`)."""
    started = time.monotonic()
    settings.workdir.mkdir(parents=True, exist_ok=True)
    reference, timings, reference_seconds = run_reference(settings)
    evals = ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in timings.evals.items())
    log(f"reference: {settings.steps} steps in {reference_seconds:.1f} s; step {timings.step * 1e3:.0f} ms, save "
        f"{timings.save * 1e3:.0f} ms, evaluations {evals}")
    trials = [run_trial(index, settings, reference, timings, log) for index in range(settings.trials)]
    report = Report(settings, reference_seconds, timings, trials, time.monotonic() - started)
    (settings.workdir / "fault_trials.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, required=True,
                        help="holds reference/, trial_<i>/, the logs, fault_trials.json (earlier trials are replaced)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial, kinds step, save, eval in rotation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint_every", type=int, default=10)
    parser.add_argument("--keep", type=int, default=3, help="config.keep_checkpoints")
    parser.add_argument("--eval_every", type=int, default=15)
    parser.add_argument("--data_dir", type=pathlib.Path, default=None,
                        help="TFDS data dir of the embedded dataset (built there on first use); default <workdir>/tfds")
    parser.add_argument("--no_compilation_cache", action="store_true")
    parser.add_argument("--run_timeout", type=float, default=600.0, help="seconds before a run counts as hung")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.kills < 0 or args.steps < 2:
        parser.error("--trials must be >= 1, --kills >= 0 and --steps >= 2")
    return Settings(workdir=args.workdir.resolve(), trials=args.trials, kills=args.kills, seed=args.seed,
                    steps=args.steps, checkpoint_every=args.checkpoint_every, keep=args.keep,
                    eval_every=args.eval_every, data_dir=args.data_dir.resolve() if args.data_dir else None,
                    compilation_cache=not args.no_compilation_cache, run_timeout=args.run_timeout)


def main(argv: list[str] | None = None) -> int:
    report = run_trials(parse_args(argv))
    print(report.table())
    print(f"details: {report.settings.workdir / 'fault_trials.json'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
