"""The matmul floor of a jitted function: every `dot_general` it computes, each timed alone at its own shapes.

A step cannot run faster than its matmuls do, and small or oddly shaped matmuls run well below the peak of a
large square one. Summing each matmul's time alone (same operand shapes, dtypes and dimension numbers, jitted by
itself, random operands) gives the step time the matmuls alone would take; the model FLOPs over that time and
the peak bound the MFU any schedule of the remaining (elementwise) work could reach. The matmuls are read from
the function's jaxpr (forward and backward, as traced), so what XLA fuses around them is not counted: the floor
is the matmuls only. Operand layouts are the default ones; inside the step XLA may pick others.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One `dot_general` as traced: operand shapes and dtypes, dimension numbers, result dtype."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_dtype: str
    rhs_dtype: str
    dimension_numbers: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
    result_dtype: str

    @property
    def flops(self) -> int:
        """2 x (batch x free lhs x free rhs x contracted) multiply-adds."""
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = self.dimension_numbers

        def free(shape: tuple[int, ...], *bound: tuple[int, ...]) -> int:
            return math.prod(size for axis, size in enumerate(shape) if not any(axis in axes for axes in bound))

        contracted = math.prod(self.lhs_shape[axis] for axis in lhs_contract)
        batch = math.prod(self.lhs_shape[axis] for axis in lhs_batch)
        return 2 * batch * contracted * free(self.lhs_shape, lhs_contract, lhs_batch) * free(
            self.rhs_shape, rhs_contract, rhs_batch)


def _sub_jaxprs(value: Any) -> Iterator[jex_core.Jaxpr]:
    """The jaxprs inside an equation parameter (a jaxpr, a closed one, or a sequence of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def matmuls(jaxpr: jex_core.Jaxpr, repeat: int = 1) -> Counter[Matmul]:
    """Every `dot_general` of `jaxpr` and the jaxprs nested in it, counted with its multiplicity (a scan body
    `length` times). Raises on a while loop or a conditional holding a matmul (their trip count or branch is
    not known from the trace) and on a convolution (not timed here), rather than leave them out."""
    found: Counter[Matmul] = Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (var.aval for var in eqn.invars)
            dims = eqn.params["dimension_numbers"]
            key = Matmul(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), str(rhs.dtype),
                         tuple(tuple(tuple(int(a) for a in axes) for axes in pair) for pair in dims),
                         str(eqn.outvars[0].aval.dtype))
            found[key] += repeat
            continue
        if name == "conv_general_dilated":
            raise ValueError("a convolution: the matmul floor times dot_generals only")
        times = repeat * int(eqn.params["length"]) if name == "scan" else repeat
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                inner = matmuls(sub, times)
                if inner and name in ("while", "cond"):
                    raise ValueError(f"a matmul inside `{name}`: its count is not known from the trace")
                found.update(inner)
    return found


def time_matmul(matmul: Matmul, calls: int = 10, repeats: int = 3, seed: int = 0) -> float:
    """Median seconds of one call of `matmul` alone: jitted, random operands, `calls` calls dispatched back to
    back and waited for once (so dispatch overlaps compute), median over `repeats` such batches."""
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal(matmul.lhs_shape), matmul.lhs_dtype)
    rhs = jnp.asarray(rng.standard_normal(matmul.rhs_shape), matmul.rhs_dtype)
    compute = jax.jit(lambda a, b: lax.dot_general(a, b, matmul.dimension_numbers,
                                                   preferred_element_type=matmul.result_dtype))
    jax.block_until_ready(compute(lhs, rhs))
    batches = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = [compute(lhs, rhs) for _ in range(calls)]
        jax.block_until_ready(results)
        batches.append((time.perf_counter() - started) / calls)
    return statistics.median(batches)


@dataclasses.dataclass
class MatmulFloor:
    """The matmuls of a function, each one's count and time alone, and their total."""

    timed: list[tuple[Matmul, int, float]]  # (matmul, count, seconds per call), slowest total first

    @property
    def seconds(self) -> float:
        return sum(count * seconds for _, count, seconds in self.timed)

    @property
    def flops(self) -> int:
        return sum(count * matmul.flops for matmul, count, _ in self.timed)

    @property
    def count(self) -> int:
        return sum(count for _, count, _ in self.timed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "matmuls": self.count,
            "distinct_shapes": len(self.timed),
            "flops": self.flops,
            "seconds": self.seconds,
            "flops_per_second": self.flops / self.seconds if self.seconds else None,
            "by_shape": [
                {"lhs": list(m.lhs_shape), "rhs": list(m.rhs_shape), "dimension_numbers": m.dimension_numbers,
                 "dtype": m.lhs_dtype, "count": count, "flops": m.flops, "seconds_each": seconds,
                 "flops_per_second": m.flops / seconds}
                for m, count, seconds in self.timed
            ],
        }


def matmul_floor(function: Callable[..., Any], *args: Any, calls: int = 10, repeats: int = 3,
                 progress: Callable[[str], None] | None = None) -> MatmulFloor:
    """Traces `function(*args)` and times each distinct matmul alone (see the module docstring)."""
    found = matmuls(jax.make_jaxpr(function)(*args).jaxpr)
    timed = []
    for index, (matmul, count) in enumerate(found.items()):
        if progress:
            progress(f"matmul {index + 1}/{len(found)}: {matmul.lhs_shape} x {matmul.rhs_shape}")
        timed.append((matmul, count, time_matmul(matmul, calls, repeats)))
    timed.sort(key=lambda item: item[1] * item[2], reverse=True)
    return MatmulFloor(timed)
