"""Loss terms: the registry, the context they see, and their weighted sum.

A method is a config, not a fork (shared/ARCHITECTURE.md, principle 1). A loss term is a pure function

    term(outputs, batch, ctx, **kwargs) -> (scalar, metrics)

where `outputs` is the model's output dict (`image_embeddings`, `text_embeddings`, `logit_scale`, ...),
`batch` the input batch dict (optionally `mask` [N] bool, False on padding rows) and `ctx` a
`LossContext`. Terms register themselves by name with `@register_term(name)` in their family module
(jclip/losses/<family>.py); a config lists the terms with their weights and keyword arguments:

    terms_config = {'clip': {'weight': 1.0}, 'siglip': {'weight': 0.5, 'ring': True}}

`total_loss` returns Σ weight·term and the metrics `loss/<name>` (unweighted) and `loss/total`.

Every term declares what it reads: `@register_term(name, reads=Reads(outputs=(...), batch=(...)))`, or a
function `reads(**kwargs) -> Reads` when that depends on the term's knobs. The train step asks the model
for the union of the outputs the terms read (so token-level outputs are computed only when a term reads
them), and start-up validation checks every field before anything is compiled, naming the term and the
field. The optional `mask` batch field (False on padding rows) need not be declared.

A term may carry state across steps (nCLIP's EMA centre): it registers `init_state(abstract_outputs,
**kwargs) -> pytree`, reads its state as `ctx.state[name]`, and returns `(value, metrics, new_state)`.
The train step keeps these states in the train state (so they are checkpointed and resume exactly) and
calls `total_loss_with_state`. New states must be computed from stop-gradient quantities.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh


@struct.dataclass
class LossContext:
    """What a loss term may know beyond the model outputs and the batch (a frozen pytree).

    mesh: the device mesh for memory-bounded cross-device losses (None: one device / no sharding).
    step: the current optimizer step (traced array inside jit, or a Python int).
    total_steps: the planned number of steps (static), for ramps and schedules.
    rng: an explicit PRNG key for stochastic terms (e.g. random tie-breaking), or None.
    state: the states of stateful terms by term name (see `init_loss_state`); {} when there are none.
    """

    mesh: Mesh | None = struct.field(pytree_node=False, default=None)
    step: jax.Array | int = 0
    total_steps: int = struct.field(pytree_node=False, default=1)
    rng: jax.Array | None = None
    state: Mapping[str, Any] = struct.field(default_factory=dict)

    @property
    def progress(self) -> jax.Array:
        """Fraction of training done, step / total_steps clipped to [0, 1] (float32)."""
        return jnp.clip(jnp.asarray(self.step, jnp.float32) / max(int(self.total_steps), 1), 0.0, 1.0)


Metrics = dict[str, jax.Array]


class LossTerm(Protocol):
    """Signature of a registered loss term; extra knobs are keyword-only arguments."""

    def __call__(
        self, outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext, **kwargs: Any
    ) -> tuple[jax.Array, Metrics]: ...


@dataclasses.dataclass(frozen=True)
class Reads:
    """What a loss term reads: model outputs and batch fields (by name)."""

    outputs: tuple[str, ...] = ()
    batch: tuple[str, ...] = ()


# name -> term function. Filled at import time by the family modules (jclip.losses imports them all).
TERMS: dict[str, LossTerm] = {}
# name -> Reads, or reads(**kwargs) -> Reads for terms whose inputs depend on their knobs.
READS: dict[str, Reads | Callable[..., Reads]] = {}
# name -> init_state(abstract_outputs, **kwargs) of the terms that carry state across steps.
STATE_INITS: dict[str, Callable[..., Any]] = {}

# Keys of a term's config entry that total_loss consumes itself; the rest are the term's kwargs.
_RESERVED_KEYS = ("weight",)


def register_term(
    name: str, *, reads: Reads | Callable[..., Reads], init_state: Callable[..., Any] | None = None
) -> Callable[[LossTerm], LossTerm]:
    """Decorator: registers a loss term under `name` (a name may be registered only once).

    `reads`: the model outputs and batch fields the term reads (a `Reads`, or a function of the term's
    config kwargs returning one). `init_state(abstract_outputs, **kwargs)`: for a term that carries state
    across steps, its initial state from the shapes of the model outputs and the term's config kwargs.
    """
    if not isinstance(reads, Reads) and not callable(reads):
        raise TypeError(f"loss term {name!r}: reads must be a Reads or a function returning one, got {reads!r}")

    def decorator(fn: LossTerm) -> LossTerm:
        existing = TERMS.get(name)
        if existing is not None and _qualname(existing) != _qualname(fn):
            raise ValueError(f"loss term {name!r} is already registered by {_qualname(existing)}")
        TERMS[name] = fn
        READS[name] = reads
        if init_state is not None:
            STATE_INITS[name] = init_state
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _as_dict(entry: Any) -> dict[str, Any]:
    """A config entry (plain mapping or ml_collections ConfigDict) as a plain dict, one level deep."""
    if hasattr(entry, "items"):
        return dict(entry.items())
    raise ValueError(f"expected a mapping of term settings, got {type(entry).__name__}: {entry!r}")


def _term_kwargs(fn: LossTerm) -> tuple[set[str], bool]:
    """The keyword arguments a term accepts (after outputs, batch, ctx), and whether it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[3:]
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def validate_terms_config(terms_config: Any) -> list[tuple[str, float, dict[str, Any]]]:
    """Checks a terms config without computing anything; returns [(name, weight, kwargs)] in order.

    Raises ValueError for: an empty config, an unknown term (listing the known ones), a weight that is
    not a finite real number, or a keyword argument the term does not take. Call it at start-up, before
    compiling the train step. A missing `weight` means 1.0.
    """
    if terms_config is None or not hasattr(terms_config, "items"):
        raise ValueError(f"terms config must map term names to settings, got {terms_config!r}")
    entries = list(terms_config.items())
    if not entries:
        raise ValueError(f"terms config is empty; known loss terms: {sorted(TERMS)}")
    parsed = []
    for name, entry in entries:
        if name not in TERMS:
            raise ValueError(f"unknown loss term {name!r}; known loss terms: {sorted(TERMS)}")
        settings = _as_dict(entry)
        weight = settings.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"loss term {name!r}: weight must be a finite number, got {weight!r}")
        accepted, takes_any = _term_kwargs(TERMS[name])
        unknown = sorted(set(settings) - accepted)
        if unknown and not takes_any:
            raise ValueError(
                f"loss term {name!r} does not take {unknown}; it takes {sorted(accepted)} (and 'weight')"
            )
        parsed.append((str(name), float(weight), settings))
    return parsed


def term_reads(terms_config: Any) -> dict[str, Reads]:
    """What each configured term reads, by term name (config order)."""
    result = {}
    for name, _, kwargs in validate_terms_config(terms_config):
        declared = READS[name]
        result[name] = declared if isinstance(declared, Reads) else declared(**kwargs)
    return result


def outputs_read(terms_config: Any) -> tuple[str, ...]:
    """The union of the model outputs the configured terms read, sorted."""
    return tuple(sorted({output for reads in term_reads(terms_config).values() for output in reads.outputs}))


def init_loss_state(terms_config: Any, abstract_outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The initial state of every stateful term of the config, by name ({} when none has state)."""
    return {
        name: STATE_INITS[name](abstract_outputs, **kwargs)
        for name, _, kwargs in validate_terms_config(terms_config)
        if name in STATE_INITS
    }


def total_loss_with_state(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext, terms_config: Any
) -> tuple[jax.Array, tuple[Metrics, dict[str, Any]]]:
    """Σ_terms weight·term(outputs, batch, ctx, **kwargs), with per-term metrics and the new term states.

    Metrics: `loss/<name>` (each term's unweighted value), `loss/total`, and whatever the terms report
    (by convention prefixed `<name>/`). A term with weight 0 is still computed, for monitoring.
    """
    total = jnp.zeros((), jnp.float32)
    metrics: Metrics = {}
    new_state: dict[str, Any] = {}
    for name, weight, kwargs in validate_terms_config(terms_config):
        if name in STATE_INITS and name not in ctx.state:
            raise ValueError(f"loss term {name!r} carries state: pass LossContext(state=init_loss_state(...))")
        result = TERMS[name](outputs, batch, ctx, **kwargs)
        if name in STATE_INITS:
            value, term_metrics, new_state[name] = result
        else:
            value, term_metrics = result
        value = jnp.asarray(value)
        if value.shape != ():
            raise ValueError(f"loss term {name!r} returned shape {value.shape}, expected a scalar")
        clash = sorted(set(term_metrics) & set(metrics))
        if clash:
            raise ValueError(f"loss term {name!r} reports metrics already reported by another term: {clash}")
        metrics.update(term_metrics)
        metrics[f"loss/{name}"] = value
        total = total + weight * value
    metrics["loss/total"] = total
    return total, (metrics, new_state)


def total_loss(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], ctx: LossContext, terms_config: Any
) -> tuple[jax.Array, Metrics]:
    """`total_loss_with_state` without the new states: (Σ weight·term, metrics)."""
    total, (metrics, _) = total_loss_with_state(outputs, batch, ctx, terms_config)
    return total, metrics
