"""jclip/convert/torch_files.py against real PyTorch, run in a subprocess of a separate interpreter (torch is
not a dependency of jclip): files torch writes read back equal, files we write load with
`torch.load(weights_only=True)`. Tests that need no torch (safety, errors, zip layout) always run."""

from __future__ import annotations

import collections
import importlib.util
import json
import pathlib
import pickle
import re
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from jclip.convert.torch_files import load_torch_state_dict, save_torch_state_dict


def _run_torch(torch_python: str, script: str, *args: object) -> None:
    try:
        subprocess.run([torch_python, "-c", script, *map(str, args)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"the PyTorch script failed (exit {e.returncode}):\n{e.stderr}")


def _assert_equal(ours: dict[str, np.ndarray], expected: np.lib.npyio.NpzFile) -> None:
    """`expected` from torch via numpy, bfloat16 as float32; ours must be contiguous arrays owning their data."""
    assert sorted(ours) == sorted(expected.files)
    for key, value in ours.items():
        assert value.flags.c_contiguous and value.flags.owndata, key
        assert value.shape == expected[key].shape, key
        compared = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
        np.testing.assert_array_equal(compared, expected[key], err_msg=key, strict=True)


_TO_NUMPY = """
def to_numpy(tensors):
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in tensors.items()}
"""

TORCH_WRITES = """
import collections, sys, numpy as np, torch
""" + _TO_NUMPY + """
out = sys.argv[1]
torch.manual_seed(0)
base = torch.randn(4, 6)
sd = collections.OrderedDict()
sd["float32"] = base
sd["transposed"] = base.t()  # non-contiguous view of base's storage
sd["slice"] = base[1:3, 2:5]  # storage offset 8, strided, same storage
sd["rows"] = base[2:]  # contiguous, storage offset 12, same storage
sd["float16"] = torch.randn(3, 2).half()
sd["bfloat16"] = torch.randn(2, 5).bfloat16()
sd["int64"] = torch.arange(-3, 4)
sd["bool"] = torch.tensor([True, False, True])
sd["scalar"] = torch.tensor(2.5)
sd["parameter"] = torch.nn.Parameter(torch.randn(2, 3))
torch.save(sd, f"{out}/state.pt")
np.savez(f"{out}/expected.npz", **to_numpy(sd))
"""


def test_reads_what_torch_writes(torch_python: str, tmp_path: pathlib.Path) -> None:
    _run_torch(torch_python, TORCH_WRITES, tmp_path)
    ours = load_torch_state_dict(tmp_path / "state.pt")
    expected = np.load(tmp_path / "expected.npz")
    _assert_equal(ours, expected)
    assert list(ours) == ["float32", "transposed", "slice", "rows", "float16", "bfloat16", "int64", "bool", "scalar",
                          "parameter"]
    assert ours["bfloat16"].dtype == ml_dtypes.bfloat16 and ours["scalar"].shape == ()
    assert ours["float16"].dtype == np.float16 and ours["int64"].dtype == np.int64 and ours["bool"].dtype == np.bool_


TORCH_READS = """
import json, sys, numpy as np, torch
""" + _TO_NUMPY + """
path, out = sys.argv[1], sys.argv[2]
sd = torch.load(path, weights_only=True)
mapped = torch.load(path, weights_only=True, mmap=True)
assert all(torch.equal(sd[k], mapped[k]) for k in sd)
info = {"type": type(sd).__name__, "keys": list(sd), "dtypes": {k: str(v.dtype) for k, v in sd.items()},
        "shapes": {k: list(v.shape) for k, v in sd.items()}}
json.dump(info, open(f"{out}/info.json", "w"))
np.savez(f"{out}/loaded.npz", **to_numpy(sd))
"""


def _all_dtypes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "float32": rng.standard_normal((3, 4)).astype(np.float32),
        "float64": rng.standard_normal(5),
        "float16": rng.standard_normal((2, 3)).astype(np.float16),
        "bfloat16": rng.standard_normal((2, 2, 3)).astype(ml_dtypes.bfloat16),
        "int64": np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
        "int32": np.array([np.iinfo(np.int32).min, 0, np.iinfo(np.int32).max], np.int32),
        "int16": np.array([np.iinfo(np.int16).min, -1, np.iinfo(np.int16).max], np.int16),
        "int8": np.array([-128, 0, 127], np.int8),
        "uint8": np.array([[0, 7, 255]], np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(1.5, np.float32),
        "scalar_int": np.array(-7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "empty_bfloat16": np.zeros((2, 0), ml_dtypes.bfloat16),
        "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # non-contiguous input is made contiguous
        "big_endian": np.arange(4, dtype=">i4"),
    }


def test_torch_reads_what_we_write(torch_python: str, tmp_path: pathlib.Path) -> None:
    arrays = _all_dtypes()
    save_torch_state_dict(arrays, tmp_path / "ours.pt")
    _run_torch(torch_python, TORCH_READS, tmp_path / "ours.pt", tmp_path)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["type"] == "OrderedDict" and info["keys"] == list(arrays)
    for key, value in arrays.items():
        assert info["dtypes"][key] == f"torch.{value.dtype.newbyteorder('=')}", key
        assert info["shapes"][key] == list(value.shape), key
    loaded = np.load(tmp_path / "loaded.npz")
    for key, value in arrays.items():
        expected = value.astype(np.float32 if value.dtype == ml_dtypes.bfloat16 else value.dtype.newbyteorder("="))
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key, strict=True)


CHECKPOINT = """
import sys, numpy as np, torch
""" + _TO_NUMPY + """
out = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
model(torch.randn(2, 3)).sum().backward()
optimizer.step()
checkpoint = {"epoch": 3, "name": "x", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
torch.save(checkpoint, f"{out}/epoch_3.pt")
np.savez(f"{out}/expected.npz", **to_numpy(model.state_dict()))
"""


def test_reads_openclip_training_checkpoint(torch_python: str, tmp_path: pathlib.Path) -> None:
    _run_torch(torch_python, CHECKPOINT, tmp_path)
    ours = load_torch_state_dict(tmp_path / "epoch_3.pt")
    _assert_equal(ours, np.load(tmp_path / "expected.npz"))
    assert list(ours) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def _zip_with_pickle(path: pathlib.Path, data: bytes) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
    return path


def test_refuses_unsafe_and_foreign_files(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "executed"
    command = pickle.dumps(f"touch {marker}", protocol=2)[2:-1]  # BINUNICODE + BINPUT of the string
    unsafe = b"\x80\x02cos\nsystem\n" + command + b"\x85R."  # os.system("touch ...")
    with pytest.raises(ValueError, match=r"os\.system"):
        load_torch_state_dict(_zip_with_pickle(tmp_path / "unsafe.pt", unsafe))
    assert not marker.exists()

    with pytest.raises(ValueError, match="'epoch_count'"):  # a non-tensor leaf
        load_torch_state_dict(_zip_with_pickle(tmp_path / "int.pt", pickle.dumps({"epoch_count": 3}, protocol=2)))
    nested = pickle.dumps(collections.OrderedDict(model={"w": 1}), protocol=2)
    with pytest.raises(ValueError, match="'model'"):
        load_torch_state_dict(_zip_with_pickle(tmp_path / "nested.pt", nested))
    with pytest.raises(ValueError, match="not a state dict"):
        load_torch_state_dict(_zip_with_pickle(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2)))

    (tmp_path / "random.bin").write_bytes(b"\x00not a torch file" * 4)
    with pytest.raises(ValueError, match="not a PyTorch zip file"):
        load_torch_state_dict(tmp_path / "random.bin")
    # torch<1.6 files start with a pickled magic number (then protocol version, system info, ...)
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(tmp_path / "legacy.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="data.pkl"):
        load_torch_state_dict(tmp_path / "other.zip")


def _rewrite(source: pathlib.Path, target: pathlib.Path, replace: dict[str, bytes]) -> pathlib.Path:
    """A copy of a torch zip with the records named in `replace` (without the archive folder) replaced."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            record = name.split("/", 1)[1]
            dst.writestr(name, replace.get(record, src.read(name)))
    return target


def test_roundtrip_layout_byteorder_and_errors_without_torch(tmp_path: pathlib.Path) -> None:
    arrays = _all_dtypes()
    path = tmp_path / "ours.pt"
    save_torch_state_dict(arrays, path)
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value.astype(value.dtype.newbyteorder("=")), strict=True)

    # torch's layout: stored records under one folder, each record's data 64-byte aligned
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert zf.read("archive/byteorder") == b"little" and zf.read("archive/version") == b"3\n"
    assert [i.filename for i in infos] == ["archive/data.pkl", "archive/byteorder"] + [
        f"archive/data/{i}" for i in range(len(arrays))] + ["archive/version"]
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        assert info.compress_type == zipfile.ZIP_STORED
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename

    # a big-endian file (as torch writes on a big-endian machine) reads as the same values
    swapped = {f"data/{i}": v.astype(v.dtype.newbyteorder("=")).view(f"u{v.dtype.itemsize}").byteswap().tobytes()
               for i, v in enumerate(arrays.values()) if v.dtype.itemsize > 1}
    big = _rewrite(path, tmp_path / "big.pt", {"byteorder": b"big", **swapped})
    for key, value in load_torch_state_dict(big).items():
        np.testing.assert_array_equal(value, arrays[key].astype(arrays[key].dtype.newbyteorder("=")), strict=True)

    # a tensor reaching past its storage's data is refused, not read out of bounds
    short = _rewrite(path, tmp_path / "short.pt", {"data/0": b"\x00" * 8})
    with pytest.raises(ValueError, match="outside its storage"):
        load_torch_state_dict(short)

    unsupported = [{"c": np.zeros(2, np.complex64)}, {"u": np.zeros(2, np.uint16)}, {"o": np.array([None])}]
    for bad in [*unsupported, {1: np.zeros(2)}]:
        with pytest.raises(ValueError, match="cannot save"):
            save_torch_state_dict(bad, tmp_path / "bad.pt")


TORCHSCRIPT = """
import sys, numpy as np, torch
""" + _TO_NUMPY + """
out = sys.argv[1]
module = torch.jit.script(torch.nn.Linear(2, 3))
torch.jit.save(module, f"{out}/scripted.pt")
np.savez(f"{out}/expected.npz", **to_numpy(module.state_dict()))
torch.save({"w": torch.ones(2)}, f"{out}/legacy.pt", _use_new_zipfile_serialization=False)
"""


def test_torchscript_and_legacy_files(torch_python: str, tmp_path: pathlib.Path) -> None:
    _run_torch(torch_python, TORCHSCRIPT, tmp_path)
    if importlib.util.find_spec("torch") is None:
        advice = re.escape('torch.jit.load(path, map_location="cpu").state_dict()')
        with pytest.raises(ValueError, match=f"TorchScript.*{advice}"):
            load_torch_state_dict(tmp_path / "scripted.pt")
    else:  # where torch is importable the module loads TorchScript with it
        _assert_equal(load_torch_state_dict(tmp_path / "scripted.pt"), np.load(tmp_path / "expected.npz"))
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(tmp_path / "legacy.pt")
