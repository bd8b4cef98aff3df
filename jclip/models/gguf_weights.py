"""Reading GGUF files (llama.cpp's format) for the pretrained decoder towers, with the `gguf` package.

A GGUF holds key-value metadata (the architecture's numbers under `<architecture>.*`, the tokenizer under
`tokenizer.ggml.*`) and tensors, many of them quantised (Q4_K, Q5_0, Q8_0, ...). `GGUFFile` opens one with
`gguf.GGUFReader` (a memory map: nothing is read before it is asked for; see `gguf_reader` for why it
reads through a plain array), checks `general.architecture`,
hands out metadata values, and dequantises each tensor to float32 with `gguf.quants.dequantize` when it is
taken. It remembers what was taken, so a loader can report the tensors it left unused.

GGUF lists a tensor's dimensions innermost first (ggml's `ne`: a [rows, columns] matrix is `[columns, rows]`);
`tensor` returns the NumPy (row-major) order, the reverse, so a linear layer comes out as torch's `weight`
[out, in].

A missing file is a FileNotFoundError, a truncated or foreign file a ValueError; both name the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

_MISSING = object()


def gguf_reader(path: str) -> Any:
    """`gguf.GGUFReader` of `path`, reading its memory map through a plain `np.ndarray` view of it.

    The reader slices its `data` once or twice per metadata element, and a slice of an `np.memmap` runs
    Python code (`memmap.__getitem__`, `__array_finalize__`) where a slice of an ndarray does not. Gemma 3's
    262,144-token vocabulary is 2.1 million slices: opening its GGUF took 10.1 s, through the plain view
    3.1 s (SmolLM2-135M: 2.7 s -> 0.7 s), with every field and tensor equal. The view's base is the map."""
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    return PlainViewReader(path)


class GGUFFile:
    """One GGUF file, opened for reading (see the module docstring)."""

    def __init__(self, path: str, architecture: str | Iterable[str] | None = None) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"the GGUF file {self.path} does not exist")
        try:
            self._reader = gguf_reader(self.path)
        except Exception as error:  # the reader raises ValueError, IndexError, ... on a short or foreign file
            raise ValueError(f"{self.path} is not a readable GGUF file (truncated or of another format: "
                             f"{type(error).__name__}: {error})") from None
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        for tensor in self._tensors.values():
            if int(tensor.data.nbytes) != int(tensor.n_bytes):
                raise ValueError(f"{self.path} is truncated: tensor {tensor.name} has {tensor.data.nbytes} of its "
                                 f"{tensor.n_bytes} bytes")
        self._taken: set[str] = set()
        self.architecture = str(self.value("general.architecture", ""))
        if architecture is not None:
            expected = (architecture,) if isinstance(architecture, str) else tuple(architecture)
            if self.architecture not in expected:
                raise ValueError(f"{self.path} holds a {self.architecture or 'unnamed'!r} model "
                                 f"(general.architecture), not {' or '.join(map(repr, expected))}")

    # -- metadata -------------------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def value(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value as Python (str, int, float, bool, or a list of them); `default` when absent, else a
        ValueError naming the file and the key."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path} has no metadata {key!r}")
            return default
        return field.contents()

    def keys(self) -> list[str]:
        return list(self._reader.fields)

    def arch_value(self, name: str, default: Any = _MISSING) -> Any:
        """`<architecture>.<name>` (e.g. `block_count`)."""
        return self.value(f"{self.architecture}.{name}", default)

    # -- tensors --------------------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's NumPy shape (GGUF's dimensions reversed)."""
        return tuple(int(n) for n in reversed(self._entry(name).shape.tolist()))

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name`, dequantised to float32 in NumPy order; marks it as taken."""
        import gguf

        entry = self._entry(name)
        values = gguf.quants.dequantize(entry.data, entry.tensor_type)
        self._taken.add(name)
        return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(self.shape(name)))

    def unused(self) -> tuple[str, ...]:
        """The tensors no `tensor` call has taken, sorted."""
        return tuple(sorted(set(self._tensors) - self._taken))

    def _entry(self, name: str) -> Any:
        try:
            return self._tensors[name]
        except KeyError:
            raise ValueError(f"{self.path} lacks the tensor {name} (its tensors start {sorted(self._tensors)[:3]})") \
                from None


def open_gguf(path: str, architecture: str | Iterable[str] | None = None) -> GGUFFile:
    """Opens `path` (FileNotFoundError / ValueError naming it), checking `general.architecture` if given."""
    return GGUFFile(path, architecture)


def check_metadata(gguf_file: GGUFFile, config: dict[str, Any], pairs: Iterable[tuple[str, str]],
                   where: str = "model.text") -> None:
    """ValueError naming the file, the metadata key and the config key for each (config key, `<arch>.` key)
    whose values differ (float keys compared to float32 rounding: GGUF stores eps and bases as float32).
    Keys the file lacks are skipped."""
    mismatches = []
    for config_key, metadata_key in pairs:
        value = gguf_file.arch_value(metadata_key, None)
        if value is None:
            continue
        wanted = config[config_key]
        if isinstance(value, float) or isinstance(wanted, float):
            same = np.float32(value) == np.float32(wanted)
        else:
            same = value == wanted
        if not same:
            mismatches.append(f"{where}.{config_key} is {wanted!r} but the file's "
                              f"{gguf_file.architecture}.{metadata_key} is {value!r}")
    if mismatches:
        raise ValueError(f"{gguf_file.path} does not match the config: " + "; ".join(mismatches))
