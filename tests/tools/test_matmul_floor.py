"""jclip.tools.matmul_floor: the matmuls found in a traced function against ones listed by hand (forward and
backward of a two-layer MLP, a scanned layer), FLOPs against counts by hand, and the cases it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from jclip.tools.matmul_floor import Matmul, matmul_floor, matmuls

BATCH, D_IN, HIDDEN, D_OUT = 8, 16, 32, 4


def mlp_loss(w1: jax.Array, w2: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(x @ w1) @ w2)


def mlp_args() -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.ones((D_IN, HIDDEN)), jnp.ones((HIDDEN, D_OUT)), jnp.ones((BATCH, D_IN))


def shapes(found) -> dict[tuple, int]:
    return {(m.lhs_shape, m.rhs_shape): count for m, count in found.items()}


def test_the_gradient_of_a_two_layer_mlp_has_its_five_matmuls():
    found = matmuls(jax.make_jaxpr(jax.grad(mlp_loss, argnums=(0, 1)))(*mlp_args()).jaxpr)
    # Forward x w1 and h w2; backward dw2 = h^T g, dh = g w2^T, dw1 = x^T dh; no dx (x is not differentiated).
    # The operand order is jax's transpose rules' own.
    assert sorted(shapes(found).items()) == sorted({
        ((BATCH, D_IN), (D_IN, HIDDEN)): 1,
        ((BATCH, HIDDEN), (HIDDEN, D_OUT)): 1,
        ((BATCH, D_OUT), (BATCH, HIDDEN)): 1,
        ((BATCH, D_OUT), (HIDDEN, D_OUT)): 1,
        ((BATCH, HIDDEN), (BATCH, D_IN)): 1,
    }.items())
    total = sum(m.flops * count for m, count in found.items())
    assert total == 2 * BATCH * (2 * D_IN * HIDDEN + 3 * HIDDEN * D_OUT)


def test_a_scanned_matmul_counts_once_per_layer_and_a_jitted_call_is_looked_into():
    layers = 5

    def stack(ws: jax.Array, x: jax.Array) -> jax.Array:
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    found = matmuls(jax.make_jaxpr(jax.jit(stack))(jnp.ones((layers, D_IN, D_IN)), jnp.ones((BATCH, D_IN))).jaxpr)
    assert shapes(found) == {((BATCH, D_IN), (D_IN, D_IN)): layers}


def test_flops_of_batched_and_multi_axis_contractions_equal_counts_by_hand():
    batched = Matmul((2, 3, 4), (2, 4, 5), "float32", "float32", (((2,), (1,)), ((0,), (0,))), "float32")
    assert batched.flops == 2 * 2 * 3 * 5 * 4
    # A q/k/v kernel's gradient: contract batch and tokens of [3, heads, head, batch, tokens] with [batch, tokens,
    # width] -> [3, heads, head, width].
    kernel_grad = Matmul((3, 4, 8, 16, 10), (16, 10, 32), "float32", "float32", (((3, 4), (0, 1)), ((), ())),
                         "float32")
    assert kernel_grad.flops == 2 * (3 * 4 * 8) * 32 * (16 * 10)


def test_matmuls_whose_count_the_trace_cannot_tell_and_convolutions_are_refused():
    def branchy(x: jax.Array, flag: jax.Array) -> jax.Array:
        return lax.cond(flag, lambda y: y @ y, lambda y: y, x)

    with pytest.raises(ValueError, match="cond"):
        matmuls(jax.make_jaxpr(branchy)(jnp.ones((4, 4)), True).jaxpr)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(x, w, (1, 1), "VALID")

    with pytest.raises(ValueError, match="convolution"):
        matmuls(jax.make_jaxpr(conv)(jnp.ones((1, 1, 4, 4)), jnp.ones((1, 1, 2, 2))).jaxpr)


def test_the_floor_times_each_shape_once_and_counts_its_repeats():
    """The MLP's gradient (five matmuls, each once) after a scan of 4 square layers (one shape, 4 times): the
    totals weigh each shape's time and FLOPs by its count."""
    layers = 4

    def deep_loss(ws: jax.Array, w1: jax.Array, w2: jax.Array, x: jax.Array) -> jax.Array:
        x = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
        return mlp_loss(w1, w2, x)

    ws = jnp.ones((layers, D_IN, D_IN))
    floor = matmul_floor(jax.grad(deep_loss, argnums=(1, 2)), ws, *mlp_args(), calls=2, repeats=1)
    # Neither ws nor x is differentiated: the scan has its forward matmuls only.
    by_shape = {(m.lhs_shape, m.rhs_shape): (count, seconds) for m, count, seconds in floor.timed}
    assert by_shape[((BATCH, D_IN), (D_IN, D_IN))][0] == layers and floor.count == layers + 5
    assert len(floor.timed) == 6 and all(seconds > 0 for _, _, seconds in floor.timed)
    square_seconds = by_shape[((BATCH, D_IN), (D_IN, D_IN))][1]
    others = sum(seconds for shape, (count, seconds) in by_shape.items() if shape != ((BATCH, D_IN), (D_IN, D_IN)))
    assert floor.seconds == pytest.approx(layers * square_seconds + others)
    report = floor.as_dict()
    assert report["flops"] == layers * 2 * BATCH * D_IN * D_IN + 2 * BATCH * (2 * D_IN * HIDDEN + 3 * HIDDEN * D_OUT)
    totals = [item["count"] * item["seconds_each"] for item in report["by_shape"]]
    assert totals == sorted(totals, reverse=True)
