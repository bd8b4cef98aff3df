"""Runs jclip on Cloud TPU VMs (v4, v5e, v5p, v6e): create the TPU, ship the exact source to every worker, start,
stop, watch and babysit a run. Stdlib only; run it from the repository root on your workstation.

    python launch/tpu.py create  --name=NAME --zone=ZONE --accelerator=v6e-8 [--capacity=spot] [--slices=K] [--wait]
    python launch/tpu.py setup   --name=NAME --zone=ZONE [--commit=SHA] [--jax-version=V]
    python launch/tpu.py run     --name=NAME --zone=ZONE --workdir=gs://BUCKET/run -- --config=configs/clip.py
    python launch/tpu.py stop|logs|status|delete --name=NAME --zone=ZONE
    python launch/tpu.py babysit --name=NAME --zone=ZONE --accelerator=v5p-64 --workdir=gs://BUCKET/run -- ...

Every gcloud call is printed as `+ command` before it runs. --dry-run prints the commands and runs none of them;
local read-only git queries still run there, because the source hash is part of what would be done.
The remote half lives in launch/tpu_setup_worker.sh and launch/tpu_worker.sh, shipped inside the source tarball.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

FALLBACK_JAX_VERSION = "0.10.2"
# Generation -> (accelerator type prefix, default runtime version).
GENERATIONS: dict[str, tuple[str, str]] = {
    "v4": ("v4", "tpu-ubuntu2204-base"),
    "v5litepod": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "v2-alpha-tpuv6e"),
}
CAPACITY_FLAGS = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}
WORKER_FILES = ("launch/tpu_worker.sh", "launch/tpu_setup_worker.sh")
WORKER_SCRIPT = '"$HOME/jclip/launch/tpu_worker.sh"'
MISSING = "NOT_FOUND"
DRY = "(dry run)"
BROKEN = frozenset({"PREEMPTED", "SUSPENDED", "FAILED", "TERMINATED"})
# The date of every file in a working-tree tarball: a fixed one keeps the tarball reproducible; not 0, because
# zip (wheel builds of the editable install) rejects dates before 1980.
SOURCE_MTIME = 946684800


class LaunchError(Exception):
    """A failure with a message for the user (exit status 1)."""


class CommandFailed(LaunchError):
    def __init__(self, command: Sequence[str], returncode: int, detail: str = "") -> None:
        message = f"exit status {returncode} from: {shlex.join(command)}"
        super().__init__(message + (f"\n{detail.strip()}" if detail.strip() else ""))
        self.returncode = returncode


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Runner:
    """The one way out to other programs: prints each command as `+ quoted command`, then runs it unless dry."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run

    def run(self, command: Sequence[str], *, capture: bool = False, quiet: bool = False, check: bool = True) -> Result:
        """capture: also return stdout (still echoed); quiet: capture stdout and stderr without echoing them."""
        print("+ " + shlex.join(command), flush=True)
        if self.dry_run:
            return Result(0)
        return self._execute(command, capture or quiet, quiet, check)

    def query(self, command: Sequence[str]) -> str:
        """A local read-only command (git): runs under --dry-run too, since its answer shapes the plan."""
        print("+ " + shlex.join(command), flush=True)
        return self._execute(command, True, True, True).stdout

    @staticmethod
    def _execute(command: Sequence[str], capture: bool, quiet: bool, check: bool) -> Result:
        try:
            if quiet or not capture:
                done = subprocess.run(command, capture_output=quiet, text=True)
                result = Result(done.returncode, done.stdout or "", done.stderr or "")
            else:
                result = _echo_and_capture(command)
        except FileNotFoundError:
            raise CommandFailed(command, 127, f"{command[0]} is not installed or not on PATH") from None
        if check and result.returncode != 0:
            raise CommandFailed(command, result.returncode, result.stderr)
        return result


def _echo_and_capture(command: Sequence[str]) -> Result:
    """Streams the command's stdout to ours line by line while keeping a copy; stderr passes straight through."""
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
    return Result(process.returncode, "".join(lines))


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU the gcloud commands address: one node (direct, or queued with --node-id) or K slices."""

    name: str
    zone: str
    project: str | None
    slices: int = 1
    direct: bool = False

    def _gcloud(self, group: str, verb: str, positionals: Sequence[str], *flags: str) -> list[str]:
        location = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return ["gcloud", "compute", "tpus", group, verb, *positionals, *location, *flags]

    @property
    def _group(self) -> str:
        return "tpu-vm" if self.direct else "queued-resources"

    def create(self, accelerator_type: str, runtime: str, capacity: str) -> list[str]:
        if self.direct:
            return self._gcloud("tpu-vm", "create", [self.name], f"--accelerator-type={accelerator_type}",
                                f"--version={runtime}", *CAPACITY_FLAGS[capacity])
        if self.slices > 1:
            nodes = [f"--node-count={self.slices}", f"--node-prefix={self.name}"]
        else:
            nodes = [f"--node-id={self.name}"]
        return self._gcloud("queued-resources", "create", [self.name], f"--accelerator-type={accelerator_type}",
                            f"--runtime-version={runtime}", *nodes, *CAPACITY_FLAGS[capacity])

    def describe(self) -> list[str]:
        field = "state" if self.direct else "state.state"
        return self._gcloud(self._group, "describe", [self.name], f"--format=value({field})")

    def delete(self) -> list[str]:
        flags = ["--quiet", "--async"] if self.direct else ["--force", "--async"]
        return self._gcloud(self._group, "delete", [self.name], *flags)

    def _workers(self, worker: str) -> tuple[str, list[str]]:
        """The ssh/scp group and flags reaching every worker: a slice through tpu-vm, several through the QR."""
        if self.slices > 1:
            return "queued-resources", ["--node=all", f"--worker={worker}"]
        return "tpu-vm", [f"--worker={worker}"]

    def scp(self, local: str, remote: str) -> list[str]:
        group, flags = self._workers("all")
        return self._gcloud(group, "scp", [local, f"{self.name}:{remote}"], *flags)

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        group, flags = self._workers(worker)
        return self._gcloud(group, "ssh", [self.name], *flags, f"--command={command}")

    @property
    def ready_state(self) -> str:
        return "READY" if self.direct else "ACTIVE"


# ---------------------------------------------------------------------------------------------------- arguments


def accelerator(text: str) -> tuple[str, str]:
    """`v6e-8` -> (accelerator type, default runtime); `v5e-N` means `v5litepod-N`."""
    match = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", text)
    if not match or int(match.group(2)) == 0:
        raise argparse.ArgumentTypeError(f"malformed accelerator {text!r}: expected GENERATION-SIZE, e.g. v6e-8 or v5p-64")
    generation, size = match.groups()
    if generation not in GENERATIONS:
        known = "v4, v5e (v5litepod), v5p, v6e"
        raise argparse.ArgumentTypeError(f"unknown TPU generation {generation!r} in {text!r}: use one of {known}")
    prefix, runtime = GENERATIONS[generation]
    return f"{prefix}-{size}", runtime


def _pattern(regex: str, what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not re.fullmatch(regex, text):
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}")
        return text
    return check


def env_pair(text: str) -> str:
    """K=V with K a shell variable name, so that the worker can export it."""
    key, sep, _ = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(
            f"--env wants KEY=VALUE with KEY a variable name ([A-Za-z_][A-Za-z0-9_]*), got {text!r}")
    return text


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def local_jax_version() -> str:
    try:
        return metadata.version("jax")
    except metadata.PackageNotFoundError:
        return FALLBACK_JAX_VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--name", required=True, type=_pattern(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", "TPU name"),
                        help="TPU (and queued resource) name; slices are NAME-0 .. NAME-(K-1)")
    target.add_argument("--zone", required=True, type=_pattern(r"[a-z0-9-]+", "zone"))
    target.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    target.add_argument("--slices", type=positive, default=1, help="multislice: K slices (queued resources only)")
    target.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")

    direct = argparse.ArgumentParser(add_help=False)
    direct.add_argument("--direct", action="store_true", help="a plain `tpu-vm create` TPU instead of a queued resource")

    provision = argparse.ArgumentParser(add_help=False)
    provision.add_argument("--accelerator", required=True, type=accelerator,
                           help="v4-N, v5litepod-N (or v5e-N), v5p-N, v6e-N")
    runtimes = ", ".join(f"{name} {runtime}" for name, (prefix, runtime) in GENERATIONS.items() if name == prefix)
    provision.add_argument("--runtime", help=f"TPU runtime version (default: {runtimes})")
    provision.add_argument("--capacity", choices=sorted(CAPACITY_FLAGS), default="on-demand")
    provision.add_argument("--poll-seconds", type=float, default=60.0, help="seconds between describe calls")

    shipping = argparse.ArgumentParser(add_help=False)
    shipping.add_argument("--commit", help="ship this commit (git archive) instead of the working tree")
    shipping.add_argument("--jax-version", default=local_jax_version(),
                          type=_pattern(r"[0-9][0-9A-Za-z.+!-]*", "jax version"),
                          help="pinned jax[tpu] version on the workers (default: the local jax's, here %(default)s)")
    shipping.add_argument("--python", default="python3",
                          help="the workers' interpreter for the venv (recent jax, 0.10 included, needs Python 3.11+)")

    naming = argparse.ArgumentParser(add_help=False)
    naming.add_argument("--run-name", default="jclip", type=_pattern(r"[A-Za-z0-9._-]+", "run name"),
                        help="names the run's folder on the workers: ~/jclip-logs/RUN")

    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--workdir", required=True, help="jclip's --workdir; must be reachable from every worker (gs://)")
    running.add_argument("--env", action="append", default=[], type=env_pair, metavar="KEY=VALUE",
                         help="environment variable for python on every worker (repeatable)")
    running.add_argument("--coordinator-port", type=positive,
                         help="JAX_COORDINATOR_PORT, e.g. 8476 when the firewall needs it")

    def add(name: str, parents: list[argparse.ArgumentParser], summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=parents, help=summary, description=summary)

    create = add("create", [target, direct, provision],
                 "Create the TPU: a queued resource, or a plain TPU VM with --direct.")
    create.add_argument("--wait", action="store_true", help="poll describe until ACTIVE (queued) / READY (direct)")
    add("setup", [target, shipping], "Ship the working tree (or --commit) to every worker and build ~/jclip-venv there.")
    add("run", [target, naming, running], "Start `python -m jclip.main ARGS` (ARGS after --) detached on every worker.")
    stop = add("stop", [target, naming], "SIGTERM the run's python on every worker, then SIGKILL after --timeout.")
    stop.add_argument("--timeout", type=positive, default=300, help="seconds to wait for the preemption save")
    add("delete", [target, direct], "Delete the TPU (asynchronously).")
    logs = add("logs", [target, naming], "Print the tail of the run's log on every worker.")
    logs.add_argument("--worker", default="all", type=_pattern(r"all|[0-9]+", "worker"), help="a worker index or all")
    logs.add_argument("--lines", type=positive, default=50)
    add("status", [target, direct, naming], "Print the TPU's state and the run's state on every worker.")
    babysit = add("babysit", [target, direct, provision, shipping, naming, running],
                  "Keep the run going: recreate a preempted TPU, set it up, rerun a failed run; stop when it finished.")
    babysit.add_argument("--max-retries", type=int, default=5, help="recreations and reruns before giving up")
    return parser


def split_jclip_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` belongs to jclip.main."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, jclip_args: list[str]) -> None:
    if getattr(args, "direct", False) and args.slices > 1:
        parser.error("--slices above 1 needs a queued resource: drop --direct")
    takes_args = args.command in ("run", "babysit")
    if jclip_args and not takes_args:
        parser.error(f"{args.command} takes no arguments after --")
    if takes_args and not jclip_args:
        parser.error("give jclip.main's flags after --, e.g. -- --config=configs/clip.py:model=B/32")
    if takes_args and not args.workdir.startswith("gs://"):
        print(f"warning: --workdir={args.workdir} is not gs://: every worker writes its own local copy, which a "
              "recreated TPU loses", file=sys.stderr)


def target_of(args: argparse.Namespace) -> Target:
    return Target(args.name, args.zone, args.project, args.slices, getattr(args, "direct", False))


# ------------------------------------------------------------------------------------------------ the resource


def describe(runner: Runner, target: Target) -> str:
    """The TPU's state (ACTIVE, READY, PREEMPTED, ...), MISSING when gcloud says NOT_FOUND, DRY under --dry-run."""
    command = target.describe()
    result = runner.run(command, quiet=True, check=False)
    if runner.dry_run:
        return DRY
    if result.returncode == 0:
        return result.stdout.strip() or "UNKNOWN"
    if MISSING in result.stderr:
        return MISSING
    raise CommandFailed(command, result.returncode, result.stderr)


def create(runner: Runner, target: Target, args: argparse.Namespace) -> None:
    accelerator_type, default_runtime = args.accelerator
    runner.run(target.create(accelerator_type, args.runtime or default_runtime, args.capacity))


def wait_ready(runner: Runner, target: Target, poll_seconds: float) -> None:
    """Polls until ACTIVE/READY; a FAILED, SUSPENDED, preempted or vanished TPU is an error naming the state."""
    while True:
        state = describe(runner, target)
        if state in (DRY, target.ready_state):
            return
        if state in BROKEN or state == MISSING:
            raise LaunchError(f"{target.name} is {state} while waiting for {target.ready_state}")
        print(f"{target.name} is {state}; next check in {poll_seconds:g} s", flush=True)
        time.sleep(poll_seconds)


def wait_gone(runner: Runner, target: Target, poll_seconds: float) -> None:
    """After an asynchronous delete: polls until describe says NOT_FOUND, so that the name can be reused."""
    while describe(runner, target) not in (MISSING, DRY):
        print(f"{target.name} is being deleted; next check in {poll_seconds:g} s", flush=True)
        time.sleep(poll_seconds)


# -------------------------------------------------------------------------------------------------- the source


@dataclasses.dataclass
class Source:
    """The code to ship: its content hash names its folder on the workers; the tarball is written by `stage`."""

    digest: str
    tarball: bytes | None = None
    commit: str | None = None

    @property
    def filename(self) -> str:
        return f"jclip-src-{self.digest}.tar.gz"

    def stage(self, runner: Runner) -> Path:
        """Writes the tarball into the temporary folder (git archive for a commit) and returns its path."""
        path = Path(tempfile.gettempdir()) / self.filename
        if self.commit:
            runner.run(["git", "archive", "--format=tar.gz", f"--output={path}", self.commit])
        elif not runner.dry_run:
            assert self.tarball is not None
            path.write_bytes(self.tarball)
        return path


def working_tree_source(runner: Runner) -> Source:
    """The exact working tree: tracked and untracked-but-not-ignored files (deleted ones skipped)."""
    listing = runner.query(["git", "ls-files", "-z", "-co", "--exclude-standard"])
    paths = sorted({path for path in listing.split("\0") if path and Path(path).is_file()})
    missing = [name for name in WORKER_FILES if name not in paths]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not in the files git lists here: run from the repository root")
    files = [(path, Path(path).read_bytes(), 0o755 if Path(path).stat().st_mode & 0o100 else 0o644) for path in paths]
    manifest = "".join(f"{mode:o} {hashlib.sha256(data).hexdigest()} {path}\n" for path, data, mode in files)
    return Source(hashlib.sha256(manifest.encode()).hexdigest()[:16], gzip.compress(tarball(files), mtime=0))


def tarball(files: list[tuple[str, bytes, int]]) -> bytes:
    """A tar of (path, content, mode) entries, owned by nobody in particular and dated SOURCE_MTIME."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data, mode in files:
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), SOURCE_MTIME, mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def commit_source(runner: Runner, commit: str) -> Source:
    """A pinned commit, named by its tree hash (identical trees share a folder)."""
    full = runner.query(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"]).strip()
    tree = runner.query(["git", "rev-parse", f"{full}^{{tree}}"]).strip()
    present = runner.query(["git", "ls-tree", "--name-only", full, *WORKER_FILES]).split()
    missing = [name for name in WORKER_FILES if name not in present]
    if missing:
        raise LaunchError(f"commit {commit} has no {', '.join(missing)}: it predates this launcher")
    return Source(tree[:16], commit=full)


def source_of(runner: Runner, args: argparse.Namespace) -> Source:
    return commit_source(runner, args.commit) if args.commit else working_tree_source(runner)


def remote_setup_command(digest: str, jax_version: str, python: str) -> str:
    """Unpacks the tarball into ~/jclip-src/DIGEST (once) and runs the setup script that came inside it."""
    script = shlex.join(["--jax-version", jax_version, "--python", python])
    return (
        f'set -e; d="$HOME/jclip-src/{digest}"; t="$HOME/jclip-src-{digest}.tar.gz"; '
        'if [ ! -d "$d" ]; then rm -rf "$d.partial"; mkdir -p "$d.partial"; tar -xzf "$t" -C "$d.partial"; '
        'mv "$d.partial" "$d"; fi; rm -f "$t"; '
        f'bash "$d/launch/tpu_setup_worker.sh" --source "$d" {script}'
    )


def setup(runner: Runner, target: Target, source: Source, jax_version: str, python: str) -> None:
    """Copies the staged tarball to every worker, sets each one up and checks that they all report the same."""
    staged = source.stage(runner)
    runner.run(target.scp(str(staged), source.filename))
    result = runner.run(target.ssh(remote_setup_command(source.digest, jax_version, python)), capture=True)
    if not runner.dry_run:
        check_setup_reports(result.stdout, source.digest)


def check_setup_reports(output: str, digest: str) -> None:
    """Every worker prints `jclip-versions: host=.. worker=.. python=.. jax=.. jaxlib=.. libtpu=.. source=..`."""
    reports = [dict(field.split("=", 1) for field in line.split() if "=" in field)
               for line in re.findall(r"jclip-versions: (.*)", output)]
    if not reports:
        raise LaunchError("no worker reported its versions after setup")
    keys = ("python", "jax", "jaxlib", "libtpu", "source")
    versions = {tuple(report.get(key, "?") for key in keys) for report in reports}
    if len(versions) > 1:
        table = "\n".join(" ".join(f"{key}={report.get(key, '?')}" for key in ("host", "worker", *keys))
                          for report in reports)
        raise LaunchError(f"the workers disagree (a slice with mixed versions hangs):\n{table}")
    if reports[0].get("source") != digest:
        raise LaunchError(f"the workers run source {reports[0].get('source')}, not {digest}")
    print(f"setup: {len(reports)} workers with " + " ".join(f"{key}={value}" for key, value in zip(keys, versions.pop())))


# ----------------------------------------------------------------------------------------------------- the run


def worker_command(mode: str, *args: str) -> str:
    """A shell command line running launch/tpu_worker.sh on a worker, every argument quoted for its shell."""
    return f"bash {WORKER_SCRIPT} {shlex.join([mode, *args])}"


def run_command(args: argparse.Namespace, jclip_args: list[str]) -> str:
    options = ["--run-name", args.run_name]
    if args.coordinator_port:
        options += ["--coordinator-port", str(args.coordinator_port)]
    for pair in args.env:
        options += ["--env", pair]
    return worker_command("start", *options, "--", f"--workdir={args.workdir}", *jclip_args)


def start_run(runner: Runner, target: Target, args: argparse.Namespace, jclip_args: list[str]) -> None:
    runner.run(target.ssh(run_command(args, jclip_args)))


def stop_run(runner: Runner, target: Target, run_name: str, timeout: int) -> None:
    runner.run(target.ssh(worker_command("stop", "--run-name", run_name, "--timeout", str(timeout))))


def status_command(run_name: str) -> str:
    """The worker script's status, or `none` on a worker that was never set up."""
    return (f"if [ -f {WORKER_SCRIPT} ]; then {worker_command('status', '--run-name', run_name)}; "
            'else echo "jclip-state: host=$(hostname) state=none"; fi')


def worker_states(runner: Runner, target: Target, run_name: str) -> list[str] | None:
    """Each worker's run state (`running`, `finished rc=0`, `none`, ...), or None when ssh failed."""
    result = runner.run(target.ssh(status_command(run_name)), capture=True, check=False)
    if result.returncode != 0:
        return None
    return re.findall(r"jclip-state: .*? state=(.*)", result.stdout)


#: jclip's exit statuses that a rerun would end with again (jclip/main.py): babysit stops instead of retrying.
FINAL_EXIT_STATUSES = {2: "a config error, or no checkpoint that can be restored", 5: "a non-finite loss or gradient"}


def verdict(states: list[str]) -> str:
    """One word for the whole run: finished, stopped (a rerun would stop the same way), failed (rerun), none (never
    started here), running or unknown."""
    if not states:
        return "unknown"
    if any(state in (f"failed rc={code}" for code in FINAL_EXIT_STATUSES) for state in states):
        return "stopped"
    if any(state.startswith(("failed", "signalled", "preempted", "lost")) for state in states):
        return "failed"
    if "none" in states:
        return "none"
    if all(state == "finished rc=0" for state in states):
        return "finished"
    return "running"


# ---------------------------------------------------------------------------------------------------- commands


def cmd_create(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    target = target_of(args)
    create(runner, target, args)
    if args.wait:
        wait_ready(runner, target, args.poll_seconds)
    return 0


def cmd_setup(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    source = source_of(runner, args)
    try:
        setup(runner, target_of(args), source, args.jax_version, args.python)
    finally:
        remove_staged(runner, source)
    return 0


def remove_staged(runner: Runner, source: Source) -> None:
    if not runner.dry_run:
        (Path(tempfile.gettempdir()) / source.filename).unlink(missing_ok=True)


def cmd_run(runner: Runner, args: argparse.Namespace, jclip_args: list[str]) -> int:
    start_run(runner, target_of(args), args, jclip_args)
    return 0


def cmd_stop(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    stop_run(runner, target_of(args), args.run_name, args.timeout)
    return 0


def cmd_delete(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    runner.run(target_of(args).delete())
    return 0


def cmd_logs(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    command = worker_command("logs", "--run-name", args.run_name, "--lines", str(args.lines))
    runner.run(target_of(args).ssh(command, worker=args.worker))
    return 0


def cmd_status(runner: Runner, args: argparse.Namespace, _: list[str]) -> int:
    target = target_of(args)
    state = describe(runner, target)
    print(f"{target.name}: {state}")
    if state in (target.ready_state, DRY):
        worker_states(runner, target, args.run_name)
    return 0


def cmd_babysit(runner: Runner, args: argparse.Namespace, jclip_args: list[str]) -> int:
    source = source_of(runner, args)
    try:
        return Babysitter(runner, target_of(args), args, jclip_args, source).loop()
    finally:
        remove_staged(runner, source)


class Babysitter:
    """Keeps one run alive: describe; recreate a missing or broken TPU; rerun a failed run; exit when it finished.

    Every recovery (recreate or rerun) counts one retry, except the first launch when nothing existed yet.
    jclip.main resumes from the latest checkpoint in the workdir, so a rerun of the same command resumes.
    """

    def __init__(self, runner: Runner, target: Target, args: argparse.Namespace, jclip_args: list[str],
                 source: Source) -> None:
        self.runner, self.target, self.args, self.jclip_args, self.source = runner, target, args, jclip_args, source
        self.retries = 0
        self.errors_in_a_row = 0

    def loop(self) -> int:
        if self.runner.dry_run:
            return self.dry_pass()
        first = True
        while True:
            try:
                done = self.step(first)
                self.errors_in_a_row = 0
            except GiveUp as error:
                print(f"babysit: giving up: {error}", file=sys.stderr)
                return 1
            except LaunchError as error:
                self.errors_in_a_row += 1
                print(f"babysit: {error}", file=sys.stderr)
                if self.errors_in_a_row >= 5:
                    print("babysit: giving up after 5 errors in a row", file=sys.stderr)
                    return 1
                done = False
            if done:
                print(f"babysit: run {self.args.run_name} finished on every worker")
                return 0
            first = False
            time.sleep(self.args.poll_seconds)

    def step(self, first: bool) -> bool:
        """One look and at most one recovery; True once every worker finished with rc=0."""
        state = describe(self.runner, self.target)
        if state == MISSING or state in BROKEN:
            if not (first and state == MISSING):
                self.count_retry(f"{self.target.name} is {state}")
            self.recreate(state)
            return False
        if state != self.target.ready_state:
            print(f"babysit: {self.target.name} is {state}", flush=True)
            return False
        states = worker_states(self.runner, self.target, self.args.run_name)
        if states is None:
            raise LaunchError("could not read the workers' run state")
        outcome = verdict(states)
        print(f"babysit: {self.target.name} is {state}; run {self.args.run_name}: {outcome} ({', '.join(states)})",
              flush=True)
        if outcome == "finished":
            return True
        if outcome == "stopped":
            codes = sorted({int(state.split("rc=")[1]) for state in states if state.startswith("failed rc=")}
                           & set(FINAL_EXIT_STATUSES))
            reasons = "; ".join(f"exit status {code}: {FINAL_EXIT_STATUSES[code]}" for code in codes)
            raise GiveUp(f"the run stopped on a worker ({reasons}), which a rerun would end with again; see "
                         f"`python launch/tpu.py logs`, fix the cause and babysit again")
        if outcome == "failed":
            self.count_retry(f"the run ended on a worker: {', '.join(states)}")
            stop_run(self.runner, self.target, self.args.run_name, 60)
            self.start()
        elif outcome == "none":
            if not first:
                self.count_retry("the workers have no run")
            self.setup_and_start()
        return False

    def count_retry(self, reason: str) -> None:
        if self.retries >= self.args.max_retries:
            raise GiveUp(f"{reason}, after {self.retries} retries (--max-retries={self.args.max_retries})")
        self.retries += 1
        print(f"babysit: {reason}: retry {self.retries} of {self.args.max_retries}", flush=True)

    def recreate(self, state: str) -> None:
        if state != MISSING:
            self.runner.run(self.target.delete())
            wait_gone(self.runner, self.target, self.args.poll_seconds)
        create(self.runner, self.target, self.args)
        wait_ready(self.runner, self.target, self.args.poll_seconds)
        self.setup_and_start()

    def setup_and_start(self) -> None:
        setup(self.runner, self.target, self.source, self.args.jax_version, self.args.python)
        self.start()

    def start(self) -> None:
        start_run(self.runner, self.target, self.args, self.jclip_args)

    def dry_pass(self) -> int:
        print("# dry run: the pass babysit makes when the TPU is preempted, then its first check of the run")
        self.recreate(describe(self.runner, self.target))
        worker_states(self.runner, self.target, self.args.run_name)
        return 0


class GiveUp(Exception):
    """The retry budget is spent."""


COMMANDS: dict[str, Callable[[Runner, argparse.Namespace, list[str]], int]] = {
    "create": cmd_create, "setup": cmd_setup, "run": cmd_run, "stop": cmd_stop, "delete": cmd_delete,
    "logs": cmd_logs, "status": cmd_status, "babysit": cmd_babysit,
}


def main(argv: list[str] | None = None) -> int:
    own, jclip_args = split_jclip_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    check_arguments(parser, args, jclip_args)
    runner = Runner(args.dry_run)
    try:
        return COMMANDS[args.command](runner, args, jclip_args)
    except CommandFailed as error:
        print(f"tpu.py: {error}", file=sys.stderr)
        return error.returncode or 1
    except LaunchError as error:
        print(f"tpu.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tpu.py: interrupted (a started run keeps going on the workers: see `stop`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
