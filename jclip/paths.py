"""Paths that may be local or on Cloud Storage (gs://, or any other fsspec URL), through etils' epath.

A TPU pod has no shared disk, so workdirs, data, exports and teachers live in a bucket. epath reads and writes
gs:// through gcsfs; Orbax and TensorStore speak GCS themselves. Local paths are made absolute, so that every
message names the same folder whatever the current directory.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import IO

import numpy as np
from etils import epath

from jclip.errors import ConfigError

PathLike = str | os.PathLike
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: PathLike) -> bool:
    """Whether `path` names a file system by scheme (gs://bucket/x, s3://..., memory://...)."""
    return bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike) -> epath.Path:
    """An epath.Path for a local path (made absolute) or a URL (kept as it is)."""
    text = os.fspath(path)
    return epath.Path(text) if is_url(text) else epath.Path(os.path.abspath(os.path.expanduser(text)))


def check_writable(path: PathLike, what: str = "workdir") -> epath.Path:
    """Creates `path` and writes and removes a probe file in it, so that a missing bucket, bad credentials or a
    read-only disk stop the run at start-up with a message naming the path, not at the first checkpoint."""
    directory = as_path(path)
    probe = directory / f".jclip-write-probe-{uuid.uuid4().hex}"
    _check_gcs_credentials(path, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("jclip")
        probe.unlink()
    except Exception as error:  # gcsfs and google-auth raise many types: any of them means "cannot write here"
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:400]
        hint = (" Check that the bucket exists and that these credentials may write to it (gcloud auth "
                "application-default login, or GOOGLE_APPLICATION_CREDENTIALS)." if is_url(path) else "")
        raise ConfigError(f"cannot write the {what} {os.fspath(path)}: {reason}.{hint}") from error
    return directory


def _check_gcs_credentials(path: PathLike, what: str) -> None:
    """For gs:// (not an emulator): Google's application-default credentials must load. Without them gcsfs
    falls back to anonymous access and fails later, after retries, with a network error."""
    if not os.fspath(path).startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as error:
        reason = " ".join(str(error).split())[:400]
        raise ConfigError(
            f"cannot write the {what} {os.fspath(path)}: no usable Google credentials ({reason}). Run `gcloud auth "
            "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file; on "
            "a Cloud TPU VM or GCE the VM's service account is used."
        ) from error


_GLOB = re.compile(r"[*?\[]")


def is_file(path: PathLike) -> bool:
    return as_path(path).is_file() if is_url(path) else os.path.isfile(path)


def open_file(path: PathLike, mode: str = "rb") -> IO:
    """Opens a local or URL file; a URL is read ahead in 8 MiB blocks, as sequential readers (tar) want."""
    if not is_url(path):
        return open(path, mode)
    import fsspec

    return fsspec.open(os.fspath(path), mode, cache_type="readahead", block_size=8 << 20).open()


def glob_files(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted: local (glob.glob) or a URL (epath, listing the bucket under the
    pattern's longest literal folder)."""
    if not is_url(pattern):
        return sorted(path for path in glob.glob(pattern) if os.path.isfile(path))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    literal = next(i for i, part in enumerate(parts) if _GLOB.search(part))
    if literal == 0:
        raise ValueError(f"{pattern}: a bucket name cannot be a glob")
    root = epath.Path(f"{scheme}://{'/'.join(parts[:literal])}")
    return sorted(os.fspath(path) for path in root.glob("/".join(parts[literal:])) if path.is_file())


def load_array(path: PathLike, *, mmap: bool = False) -> np.ndarray:
    """A `.npy` file: local ones memory-mapped read-only when `mmap`; a URL's is read whole (a bucket cannot be
    memory-mapped, so each process that opens it holds its own copy)."""
    if is_url(path):
        return np.load(io.BytesIO(epath.Path(path).read_bytes()))
    return np.load(path, mmap_mode="r" if mmap else None)


def save_array(path: PathLike, array: np.ndarray) -> None:
    """`np.save` to a local path or a URL (through epath; never a local folder named `gs:`)."""
    if not is_url(path):
        np.save(path, array)
        return
    with epath.Path(path).open("wb") as file:
        np.save(file, array)


def upload_folder(local: PathLike, target: PathLike, *, last: Iterable[str] = ()) -> None:
    """Copies every file under the local folder `local` to the same relative path under `target` (a URL, or a
    local folder). The files named in `last` (relative paths) go after all others: a reader that waits for them
    (dataset_info.json, dataset.json) never sees a half-copied folder."""
    root = os.fspath(local)
    files = sorted(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                   for folder, _, names in os.walk(root) for name in names)
    final = [name for name in last if name in files]
    destination = epath.Path(os.fspath(target))
    for name in [name for name in files if name not in final] + final:
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(root, name), "rb") as source, (destination / name).open("wb") as copy:
            shutil.copyfileobj(source, copy, 16 << 20)


def file_sizes(root: PathLike) -> dict[str, int]:
    """Every file under the folder `root`, local or a URL: relative POSIX path -> size in bytes ({} if there is
    no such folder). A URL is listed afresh, since others (TensorStore, other processes) write there too."""
    text = os.fspath(root)
    if not is_url(text):
        return {os.path.relpath(os.path.join(folder, name), text).replace(os.sep, "/"):
                os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(text) for name in names}
    fs, remote = _filesystem(text)
    remote = remote.rstrip("/")
    fs.invalidate_cache(remote)
    found = fs.find(remote, detail=True)
    return {name[len(remote):].lstrip("/"): int(info.get("size") or 0)
            for name, info in found.items() if info.get("type") != "directory"}


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local path to read `path` from: `path` itself, or for a URL a temporary download of the file or
    folder, removed afterwards (for readers that need a local file: torch.load, safetensors, memory maps).
    FileNotFoundError names a URL that does not exist."""
    text = os.fspath(path)
    if not is_url(text):
        yield text
        return
    fs, remote = _filesystem(text)
    if not fs.exists(remote):
        raise FileNotFoundError(f"no such file or folder: {text}")
    with tempfile.TemporaryDirectory(prefix="jclip-download-") as folder:
        local = os.path.join(folder, posixpath.basename(remote.rstrip("/")) or "download")
        fs.get(remote.rstrip("/") + ("/" if fs.isdir(remote) else ""), local, recursive=fs.isdir(remote))
        yield local


@contextlib.contextmanager
def local_output(path: PathLike) -> Iterator[str]:
    """A local folder to write an output folder into: `path` itself, or for a URL a temporary folder whose
    files are uploaded to `path` once the body finishes without error (for writers that need local files).
    FileExistsError up front when the URL already holds files."""
    text = os.fspath(path)
    if not is_url(text):
        yield text
        return
    fs, remote = _filesystem(text)
    if fs.exists(remote) and fs.ls(remote):
        raise FileExistsError(f"{text} exists and is not empty; choose a new folder")
    with tempfile.TemporaryDirectory(prefix="jclip-upload-") as folder:
        local = os.path.join(folder, "output")
        yield local
        upload_folder(local, text)


def as_written(local: PathLike, staged: str, destination: PathLike) -> str:
    """The name under `destination` of a file written at `local` inside the `local_output` folder `staged`."""
    relative = os.path.relpath(os.fspath(local), staged)
    return os.fspath(destination) if relative == "." else posixpath.join(os.fspath(destination), relative)
