"""The model contract, proven by a toy method added without editing any jclip module (tests/toy_method/:
a loss term, a preprocessing op and a config). It reads a new per-example field [B, K, L] and the
`text_tokens` output, trains on 8 fake devices and gets the 1-device losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jclip_testing import REPO_ROOT, cpu_env, micro_run_flags, read_losses

TOY_CONFIG = REPO_ROOT / "tests" / "toy_method" / "config.py"


def run_toy(workdir, flags, devices):
    env = cpu_env(devices, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "jclip.main", f"--config={TOY_CONFIG}", f"--workdir={workdir}", *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_toy_method_trains_the_same_on_one_and_eight_devices(tmp_path, scenes_data_dir):
    flags = micro_run_flags(scenes_data_dir, total_steps=3, checkpoint_every=100)
    run_toy(tmp_path / "one", flags + ["--config.mesh.data=1"], devices=1)
    run_toy(tmp_path / "eight", flags + ["--config.mesh.data=4", "--config.mesh.fsdp=2"], devices=8)
    one, eight = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == [1, 2, 3]
    np.testing.assert_allclose([eight[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5, atol=1e-6)

    records = [json.loads(line) for line in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "loss/toy_hard_negatives" in r]
    assert len(step_records) == 3
    for record in step_records:
        # The shuffled copies reached the term (most differ from their caption) and so did the text tokens.
        assert 0.5 < record["toy/negatives_used"] <= 1.0
        assert -1.0 <= record["toy/token_alignment"] <= 1.0 and record["toy/token_alignment"] != 0.0
        # The weighted sum of the two terms is the total.
        np.testing.assert_allclose(record["loss/total"], record["loss/clip"] + 0.5 * record["loss/toy_hard_negatives"],
                                   rtol=1e-5)


def test_toy_term_matches_a_numpy_loop():
    """The toy term on hand-made outputs equals a float64 loop (so the end-to-end numbers mean something)."""
    import jax.numpy as jnp

    from toy_method.loss import toy_hard_negatives

    from jclip.losses import LossContext

    rng = np.random.default_rng(0)
    b, k, length, d = 3, 2, 5, 4

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    images, texts, shuffled = unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, k, d)))
    tokens = rng.normal(size=(b, length, d))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    token_ids = rng.integers(1, 9, size=(b, length))
    shuffled_ids = np.repeat(token_ids[:, None], k, axis=1)
    shuffled_ids[0, 0, 0] += 1  # only example 0's first copy differs from its caption...
    shuffled_ids[2, :, 1] += 1  # ...and both of example 2's
    log_scale = 1.5
    outputs = {"image_embeddings": jnp.asarray(images), "text_embeddings": jnp.asarray(texts),
               "shuffled_text_embeddings": jnp.asarray(shuffled), "text_tokens": jnp.asarray(tokens),
               "text_token_mask": jnp.asarray(mask), "logit_scale": jnp.asarray(log_scale)}
    batch = {"token_ids": jnp.asarray(token_ids), "shuffled_token_ids": jnp.asarray(shuffled_ids)}
    value, metrics = toy_hard_negatives(outputs, batch, LossContext())

    scale, total_ce, total_align = np.exp(log_scale), 0.0, 0.0
    for i in range(b):
        logits = [scale * images[i] @ texts[i]]
        logits += [scale * images[i] @ shuffled[i, j] for j in range(k) if (shuffled_ids[i, j] != token_ids[i]).any()]
        total_ce += np.log(np.sum(np.exp(logits))) - logits[0]
        cosines = [tokens[i, t] @ images[i] / np.linalg.norm(tokens[i, t]) for t in range(length) if mask[i, t]]
        total_align += np.mean(cosines)
    expected = total_ce / b + 0.1 * (1 - total_align / b)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["toy/negatives_used"]), 3 / 6)
