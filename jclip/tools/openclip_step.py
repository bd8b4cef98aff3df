"""OpenCLIP's train step, timed: the reference side of `python -m jclip.tools.bench_step --against-openclip`.

Run by path with an interpreter that has torch and open_clip (never imported by jclip; it imports only torch,
open_clip, numpy and the standard library):

    python openclip_step.py '{"model": {...}, "batch": 64, "dtype": "float32", "device": "cpu", ...}'

`model` is OpenCLIP's model config (`jclip.convert.openclip.openclip_model_config`); the step is OpenCLIP's own
training step (open_clip_train's train_one_epoch without its data loader): `open_clip.model.CLIP`, `ClipLoss`,
backward, global-norm clipping when `optim.grad_clip_norm` > 0, `torch.optim.AdamW` at the constant
`optim.learning_rate`, then the logit-scale clamp. Weight decay falls on the parameters jclip decays (matrices
of two or more dimensions except embeddings; the patch convolution is jclip's `patch_embedding`). bfloat16 runs
under `torch.autocast` with float32 parameters; float32 on CUDA allows TF32 matmuls, as JAX's default precision
does. The batch is fixed (normal images, token ids uniform in [1, vocab)). Prints one JSON line.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg


def build_model(model_config: dict[str, Any]) -> CLIP:
    """OpenCLIP's CLIP of the given config (exact GELU unless `quick_gelu`)."""
    return CLIP(int(model_config["embed_dim"]), vision_cfg=CLIPVisionCfg(**model_config["vision_cfg"]),
                text_cfg=CLIPTextCfg(**model_config["text_cfg"]), quick_gelu=bool(model_config.get("quick_gelu")),
                output_dict=True)


def decays(name: str, parameter: torch.Tensor) -> bool:
    """jclip's weight-decay rule (jclip/optim.py) in OpenCLIP's parameter names."""
    return parameter.ndim >= 2 and "embedding" not in name and name != "visual.conv1.weight"


def make_optimizer(model: CLIP, optim: dict[str, Any]) -> torch.optim.AdamW:
    decayed = [p for n, p in model.named_parameters() if decays(n, p)]
    others = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [{"params": decayed, "weight_decay": float(optim["weight_decay"])},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=float(optim["learning_rate"]), betas=(float(optim["b1"]), float(optim["b2"])),
                             eps=float(optim["eps"]))


def make_batch(spec: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    vision, text = spec["model"]["vision_cfg"], spec["model"]["text_cfg"]
    size = vision["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    images = rng.standard_normal((spec["batch"], 3, height, width)).astype(np.float32)
    tokens = rng.integers(1, int(text["vocab_size"]), (spec["batch"], int(text["context_length"])))
    return torch.from_numpy(images).to(device), torch.from_numpy(tokens).long().to(device)


def main(spec: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(int(spec.get("seed", 0)))
    device = torch.device(spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and spec["dtype"] == "float32":
        torch.set_float32_matmul_precision("high")  # TF32, like JAX's default precision on Ampere and later
    model = build_model(spec["model"]).to(device).train()
    optim = spec["optim"]
    optimizer = make_optimizer(model, optim)
    loss_fn = ClipLoss()
    images, tokens = make_batch(spec, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")
    clip_norm = float(optim.get("grad_clip_norm") or 0.0)
    max_log_scale = float(spec.get("max_log_logit_scale", math.log(100)))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(images, tokens)
            loss = loss_fn(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        return loss

    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss = float(step().detach())
    for _ in range(int(spec["warmup"]) - 1):
        step()
    wait()
    seconds = []
    for _ in range(int(spec["steps"])):
        started = time.perf_counter()
        step()
        wait()
        seconds.append(time.perf_counter() - started)
    parameters = list(model.named_parameters())
    return {
        "params": sum(p.numel() for _, p in parameters),
        "decayed_params": sum(p.numel() for n, p in parameters if decays(n, p)),
        "step_seconds": seconds,
        "median_step_seconds": statistics.median(seconds),
        "first_loss": first_loss,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
