"""Preprocessing ops by name: the registry, the op-list parser and the chain that runs them per example.

An op is built by a factory registered with `@register_op("name")`, called as `factory(context, **kwargs)`;
it has `reads` and `writes` (field names), optionally `consumes` (fields it uses up, dropped from the batch)
and `link(later_ops)` (called once by `make_ops` with the ops after it), and `__call__(example, rng) ->
example` with its written fields added or replaced. A bad example raises
`jclip.data.robust.BadExample(reason)`; `Preprocess` turns that into a counted skip. Any module may
register an op (a test, a user's method): importing `register_op` is enough, and nothing in jclip changes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jclip.data import robust


@dataclasses.dataclass(frozen=True)
class OpContext:
    """What ops may take from the run's config: the model's input sizes, the tokenizer, training or not."""

    image_size: int
    context_length: int
    tokenizer_spec: str = "clip"
    training: bool = True
    random_crop_scale: tuple[float, float] | None = None  # `data.random_crop_scale`: crop_image's default
    jpeg_draft: bool = True  # `data.jpeg_draft`: decode_image's default (DCT-scaled decoding of large JPEGs)


class Op:
    """Base of the built-in ops (any object with `reads`, `writes` and `__call__` is an op)."""

    name: str = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()

    def __call__(self, example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, reads={self.reads}, writes={self.writes})"


OpFactory = Callable[..., Any]
_REGISTRY: dict[str, OpFactory] = {}


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """Registers `factory(context, **kwargs) -> op` under `name` (a class or a function)."""
    if not name.isidentifier():
        raise ValueError(f"an op name must be a Python identifier, got {name!r}")

    def register(factory: OpFactory) -> OpFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory and _qualname(existing) != _qualname(factory):
            raise ValueError(f"op {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = factory
        return factory

    return register


def _qualname(factory: OpFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def known_ops() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def parse_ops(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`"a|b(x=1, y='s')"` -> [("a", {}), ("b", {"x": 1, "y": "s"})]; arguments are keyword Python literals."""
    text = " ".join(str(spec).split())
    if not text:
        raise ValueError("an empty op list: data.preprocess names ops separated by '|'")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"cannot parse the op list {spec!r}: {error.msg}; write name|name(key=literal, ...)") from None
    items: list[ast.expr] = []
    while isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitOr):
        items.insert(0, tree.right)
        tree = tree.left
    items.insert(0, tree)
    parsed = []
    for item in items:
        where = f"op {ast.unparse(item)!r} in {spec!r}"
        if isinstance(item, ast.Name):
            parsed.append((item.id, {}))
            continue
        if not isinstance(item, ast.Call) or not isinstance(item.func, ast.Name):
            raise ValueError(f"{where}: an op is a name or name(key=literal, ...)")
        if item.args or any(keyword.arg is None for keyword in item.keywords):
            raise ValueError(f"{where}: give op arguments by keyword (name(key=literal))")
        kwargs = {}
        for keyword in item.keywords:
            try:
                kwargs[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                raise ValueError(f"{where}: argument {keyword.arg}={ast.unparse(keyword.value)} is not a "
                                 f"Python literal (quote strings: {keyword.arg}='...')") from None
        parsed.append((item.func.id, kwargs))
    return parsed


def make_op(name: str, context: OpContext, **kwargs: Any) -> Any:
    """One op by name; ValueError for an unknown name (listing the known ops) or a bad argument."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown preprocessing op {name!r}; known ops: {', '.join(known_ops())}")
    parameters = [p for p in list(inspect.signature(factory).parameters.values())[1:]
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    accepted = {p.name for p in parameters}
    described = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters)
    unknown = sorted(set(kwargs) - accepted)
    missing = [p.name for p in parameters if p.default is p.empty and p.name not in kwargs]
    if unknown or missing:
        problem = f"unknown argument(s) {unknown}" if unknown else f"missing argument(s) {missing}"
        raise ValueError(f"op {name!r}: {problem}; its arguments: {described or '(none)'}")
    try:
        op = factory(context, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"op {name!r}: {error}; its arguments: {described or '(none)'}") from None
    if not getattr(op, "name", ""):
        try:
            op.name = name
        except AttributeError:
            pass
    for attribute in ("reads", "writes"):
        value = getattr(op, attribute, None)
        if not isinstance(value, tuple) or not all(isinstance(field, str) for field in value):
            raise ValueError(f"op {name!r} must have `{attribute}`: a tuple of field names, got {value!r}")
    return op


def make_ops(spec: str, context: OpContext) -> list[Any]:
    """The ops of an op list (see `parse_ops`), built for `context` and linked (`link_ops`)."""
    return link_ops([make_op(name, context, **kwargs) for name, kwargs in parse_ops(spec)])


def link_ops(ops: list[Any]) -> list[Any]:
    """Shows every op with a `link(later_ops)` method the ops after it, once, when the list is built.

    Lets an op adapt to what follows without fields for it in the examples: `decode_image` sizes its JPEG
    draft by the `crop_image` after it. The same ops, returned.
    """
    for index, op in enumerate(ops):
        link = getattr(op, "link", None)
        if callable(link):
            link(ops[index + 1:])
    return ops


def op_name(op: Any) -> str:
    return getattr(op, "name", "") or type(op).__name__


def batch_fields(ops: Sequence[Any]) -> dict[str, str]:
    """field -> name of the op that writes it, for every field an op writes and no later op consumes."""
    fields: dict[str, str] = {}
    for op in ops:
        for field in getattr(op, "consumes", ()):
            fields.pop(field, None)
        for field in op.writes:
            fields.pop(field, None)  # the last writer's place in the order
            fields[field] = op_name(op)
    return fields


class Preprocess:
    """Runs ops in order on a raw example and returns the batch fields, or a `Skipped` marker.

    Every batch field must be a NumPy array (or scalar) of one shape for every example: a field that is
    not, or whose shape changes, is a ValueError naming the op and the field.
    """

    def __init__(self, ops: Sequence[Any], *, key_field: str = "key"):
        self.ops = list(ops)
        self.key_field = key_field
        self.fields = batch_fields(self.ops)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"ops": self.ops, "key_field": self.key_field}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ops"], key_field=state["key_field"])

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None
                 ) -> dict[str, np.ndarray] | robust.Skipped:
        current = dict(example)
        try:
            for op in self.ops:
                current = op(current, rng)
        except robust.BadExample as bad:
            return robust.Skipped(bad.reason, robust.example_key(example, self.key_field), bad.detail)
        return {field: self._checked(field, writer, current, example) for field, writer in self.fields.items()}

    def _checked(self, field: str, writer: str, current: Mapping[str, Any], example: Mapping[str, Any]) -> Any:
        def key() -> str | None:  # for messages only: not computed for good examples
            return robust.example_key(example, self.key_field)

        if field not in current:
            raise ValueError(f"op {writer!r} declares that it writes {field!r}, but example {key()!r} has no {field!r}")
        value = current[field]
        if not isinstance(value, (np.ndarray, np.generic)):
            raise ValueError(
                f"op {writer!r} wrote {field!r} as {type(value).__name__} (example {key()!r}): every field of a "
                f"batch must be a NumPy array of one shape; end the op list with ops that make arrays "
                f"(e.g. normalise_image after crop_image, tokenize after choose_caption)")
        shape = np.shape(value)
        first = self._shapes.get(field)
        if first is None:
            with self._lock:
                first = self._shapes.setdefault(field, shape)
        if first != shape:
            raise ValueError(f"op {writer!r} wrote {field!r} of shape {shape} for example {key()!r}, but of shape "
                             f"{first} before: every field of a batch must have one shape for all examples")
        return value
