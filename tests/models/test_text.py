"""Tests for jclip/models/text.py: causal mask, pooling at the end-of-text token (largest id)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jclip.models.text import TextTransformer

EOT = 63  # the largest id of the 64-token vocabulary


@pytest.fixture(scope="module")
def tower() -> TextTransformer:
    return TextTransformer(context_length=8, vocab_size=64, width=32, heads=2, layers=2, output_dim=8,
                           rngs=nnx.Rngs(0))


def test_tokens_after_end_of_text_do_not_matter(tower: TextTransformer) -> None:
    ids = jnp.array([[62, 5, 9, EOT, 0, 0, 0, 0]])
    after_eot = ids.at[0, 5].set(17)
    before_eot = ids.at[0, 1].set(17)
    np.testing.assert_allclose(tower(ids), tower(after_eot), atol=0)
    assert not np.allclose(tower(ids), tower(before_eot), atol=1e-4)


def test_pools_at_largest_id_and_accepts_shorter_sequences(tower: TextTransformer) -> None:
    """A sequence cut right after its end token gives the same features as the padded one."""
    ids = jnp.array([[62, 5, 9, EOT, 3, 0, 0, 0], [62, 1, 2, 3, 4, 5, 6, EOT]])
    full = tower(ids)
    np.testing.assert_allclose(tower(ids[:1, :4]), full[:1], atol=1e-5)
    # Moving the end token moves the pooled position.
    moved = ids.at[0, 3].set(9).at[0, 2].set(EOT)
    assert not np.allclose(tower(moved)[0], full[0], atol=1e-4)


def test_shapes_and_length_check(tower: TextTransformer) -> None:
    features = tower(jnp.ones((3, 8), jnp.int32))
    assert features.shape == (3, 8) and features.dtype == jnp.float32
    with pytest.raises(ValueError, match="context_length"):
        tower(jnp.ones((1, 9), jnp.int32))
