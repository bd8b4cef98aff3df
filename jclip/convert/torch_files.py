"""Read and write PyTorch state-dict files (the `torch.save` zip format of OpenCLIP `.pt` checkpoints and
Hugging Face `pytorch_model.bin`) as `dict[str, numpy.ndarray]`, without PyTorch.

A torch file is a zip archive `<name>/data.pkl` (a pickle whose tensors point by key at the raw storages
`<name>/data/<key>`), `<name>/byteorder` and `<name>/version`. Unpickling only resolves an allow-list of
torch's tensor-rebuild functions, storage classes and dtypes, each mapped to a NumPy stand-in, so a file
can neither run code nor need torch; anything else is a `ValueError` naming the global.
"""

from __future__ import annotations

import builtins
import collections
import importlib.util
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

# torch dtype name -> NumPy dtype; the legacy storage classes torch still writes for the first ten.
_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_SAVE_STORAGES = {np.dtype(_DTYPES[dtype]): name for name, dtype in list(_STORAGES.items())[:10]}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _StorageType(NamedTuple):  # a storage class of the pickle; dtype None: UntypedStorage (typed by v3 rebuild)
    dtype: np.dtype | None


class _Storage(NamedTuple):  # a storage of the pickle: the data is the archive's `data/<key>`
    key: str
    dtype: np.dtype | None


class _LazyTensor(NamedTuple):
    """A tensor of the pickle, read from its storage only if it ends up in the returned state dict."""
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_v3(storage, offset, shape, stride, requires_grad, hooks, dtype, metadata=None) -> _LazyTensor:
    """Stands in for `torch._utils._rebuild_tensor_v3` (and, with the storage's dtype, `_v2`)."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):  # dtypes only come from `_ALLOWED`
        raise ValueError("malformed torch file: a tensor without a typed storage")
    return _LazyTensor(storage, offset, tuple(shape), tuple(stride), dtype)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda storage, offset, shape, stride, *rest: _rebuild_v3(
        storage, offset, shape, stride, None, None, getattr(storage, "dtype", None)),
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, requires_grad, hooks, state: data,
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    ("torch", "UntypedStorage"): _StorageType(None),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("builtins", name): getattr(builtins, name) for name in ("set", "frozenset", "complex", "slice", "bytearray")},
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode("latin1"),  # bytes in pickle protocol 2
    **{("torch", name): _StorageType(np.dtype(_DTYPES[dtype])) for name, dtype in _STORAGES.items()},
    **{("torch", name): np.dtype(dtype) for name, dtype in _DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise ValueError(f"torch file refers to {module}.{name}, which is not a tensor, storage or plain "
                             "container; refusing to unpickle it (jclip only reads state dicts of tensors)")
        return _ALLOWED[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ValueError(f"malformed torch file: unexpected persistent id {pid!r}")
        return _Storage(str(pid[2]), pid[1].dtype)


def _materialize(zf: zipfile.ZipFile, prefix: str, tensors: Mapping[str, _LazyTensor], swap: bool) -> dict:
    """Copies each tensor out of its storage (read once, dropped after its last tensor) as a contiguous array."""
    users = collections.Counter(t.storage.key for t in tensors.values())
    cache: dict[str, bytes] = {}
    out = {}
    for name, t in tensors.items():
        key = t.storage.key
        if key not in cache:
            cache[key] = zf.read(f"{prefix}data/{key}")
        raw = cache[key]
        flat = np.frombuffer(raw, t.dtype, count=len(raw) // t.dtype.itemsize)
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
        if t.offset < 0 or min(t.stride, default=0) < 0 or (0 not in t.shape and last >= flat.size):
            raise ValueError(f"malformed torch file: tensor {name!r} lies outside its storage {key!r}")
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, [s * t.dtype.itemsize for s in t.stride])
        array = np.array(view, copy=True, order="C")
        if swap and array.dtype.itemsize > 1:
            array.view(f"u{array.dtype.itemsize}").byteswap(inplace=True)
        out[name] = array
        users[key] -= 1
        if not users[key]:
            del cache[key]
    return out


def _torchscript_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            f"{path} is a TorchScript model (e.g. OpenAI's original CLIP .pt), which only PyTorch can read. Convert "
            "it once where torch is installed: `sd = torch.jit.load(path, map_location=\"cpu\").state_dict()`, then "
            "save `sd` with safetensors (`safetensors.torch.save_file`) or torch.save and load that file instead")
    import torch  # only here: torch is not a dependency of jclip

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return np.array(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), copy=True)
        return np.array(t.numpy(), copy=True)

    return {k: to_numpy(v) for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict (or of the `"state_dict"` of an OpenCLIP training checkpoint)
    as NumPy arrays (bfloat16 as `ml_dtypes.bfloat16`), read without PyTorch."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
        if legacy:
            raise ValueError(f"{path} is in PyTorch's legacy (torch<1.6, non-zip) format, which jclip does not read; "
                             "re-save it with a recent torch (torch.save(torch.load(path), path)) or as safetensors")
        raise ValueError(f"{path} is not a PyTorch zip file (nor the legacy torch<1.6 format)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise ValueError(f"{path} is a zip file without <archive>/data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
            return _torchscript_state_dict(path)
        byteorder = zf.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        with zf.open(pickles[0]) as f:
            obj = _RestrictedUnpickler(f).load()
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, _LazyTensor):
                raise ValueError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        return _materialize(zf, prefix, obj, swap=byteorder != sys.byteorder)


class _Global(NamedTuple):
    """Stands in for a torch global (a function or storage class), pickled by its name alone."""
    module: str
    name: str

    def __reduce__(self) -> str:
        return self.name  # a string: "save me as a global", see `_StatePickler.save_global`

    def __call__(self, *args: Any) -> None:  # pickle requires the function of a reduction to be callable
        raise TypeError(f"{self.module}.{self.name} is a stand-in for pickling only")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", name) for dtype, name in _SAVE_STORAGES.items()}


class _StorageRef(NamedTuple):  # the storage of one array: pickled as its persistent id, written to data/<key>
    key: str
    array: np.ndarray


class _TensorRef(NamedTuple):  # a contiguous CPU tensor over a whole storage, pickled as torch pickles one
    storage: _StorageRef

    def __reduce__(self) -> tuple:
        stride, step = [], 1
        for n in reversed(self.storage.array.shape):  # torch's contiguous strides (a size of 0 counts as 1)
            stride.insert(0, step)
            step *= max(n, 1)
        args = (self.storage, 0, self.storage.array.shape, tuple(stride), False, collections.OrderedDict())
        return _REBUILD_TENSOR, args


class _StatePickler(pickle._Pickler):  # the Python pickler: its `save_global` can be overridden, the C one's not
    def save_global(self, obj: Any, name: str | None = None) -> None:
        if not isinstance(obj, _Global):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _StorageRef):
            return ("storage", _STORAGE_GLOBALS[obj.array.dtype], obj.key, "cpu", obj.array.size)
        return None


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes `state_dict` (names -> arrays) as a file that `torch.load(path, weights_only=True)` reads into an
    `OrderedDict[str, torch.Tensor]`, for PyTorch users of jclip's weights; needs no torch."""
    arrays = {}
    for key, value in state_dict.items():
        array = np.asarray(value)
        if not isinstance(key, str) or array.dtype.newbyteorder("=") not in _SAVE_STORAGES:
            raise ValueError(f"cannot save {key!r} ({array.dtype}): torch files hold str keys and dtypes "
                             f"{sorted(str(d) for d in _SAVE_STORAGES)}")
        arrays[key] = np.asarray(array, array.dtype.newbyteorder("="), order="C")  # keeps 0-d arrays 0-d
    storages = [_StorageRef(str(i), array) for i, array in enumerate(arrays.values())]
    tensors = collections.OrderedDict((key, _TensorRef(s)) for key, s in zip(arrays, storages))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        def write(name: str, data: bytes | np.ndarray) -> None:
            info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            view = memoryview(data if isinstance(data, bytes) else data.reshape(-1).view(np.uint8))
            zip64 = len(view) * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides; adds a 20-byte extra field
            header = 30 + len(info.filename) + (20 if zip64 else 0)
            pad = -(zf.fp.tell() + header + 4) % 64  # align the data to 64 bytes, as torch does
            info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad  # torch's padding field id "FB"
            info.file_size = len(view)
            with zf.open(info, "w", force_zip64=zip64) as f:
                f.write(view)

        buffer = io.BytesIO()
        _StatePickler(buffer, protocol=2).dump(tensors)
        write("data.pkl", buffer.getvalue())
        write("byteorder", sys.byteorder.encode())
        for storage in storages:
            write(f"data/{storage.key}", storage.array)
        write("version", b"3\n")
