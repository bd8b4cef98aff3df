"""The two layouts of the towers' transformer blocks, and conversion between them.

Per layer (`model.scan_layers=False`, OpenCLIP's layout): `<tower>/transformer/blocks/<i>/<name>` [...].
Stacked (`model.scan_layers=True`, `jclip.models.layers.Transformer`): `<tower>/transformer/blocks/<name>`
[layers, ...], layer i at index i of the leading axis. Exports, imports and the host side of conversion
(`jclip.convert`) use the per-layer layout; `to_layout` gives a parameter tree the layout of another (e.g. a
per-layer export loaded into a scanned run by `init_from`).

Functions here take flat dicts `{path tuple: leaf}`; leaves are NumPy arrays, jax Arrays or
ShapeDtypeStructs (stacked with NumPy, jax.numpy, or by shape).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[Any, ...]
BLOCKS = ("transformer", "blocks")


def _split(path: Path) -> tuple[Path, int | None, Path] | None:
    """(path up to `transformer/blocks`, layer index or None when stacked, the rest); None outside blocks."""
    for start in range(len(path) - 2):
        if tuple(path[start:start + 2]) == BLOCKS:
            head = path[start + 2]
            if isinstance(head, (int, np.integer)) or (isinstance(head, str) and head.isdigit()):
                return tuple(path[:start + 2]), int(head), tuple(path[start + 3:])
            return tuple(path[:start + 2]), None, tuple(path[start + 2:])
    return None


def is_stacked(params: Mapping[Path, Any]) -> bool:
    """Whether any block parameter of `params` is in the stacked layout."""
    return any((parts := _split(path)) is not None and parts[1] is None for path in params)


def _index(leaf: Any, index: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[index]


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def unstack(params: Mapping[Path, Any]) -> dict[Path, Any]:
    """`params` with every stacked block parameter split into per-layer ones (the rest unchanged)."""
    result = {}
    for path, leaf in params.items():
        parts = _split(path)
        if parts is None or parts[1] is not None:
            result[path] = leaf
            continue
        prefix, _, rest = parts
        for index in range(leaf.shape[0]):
            result[(*prefix, index, *rest)] = _index(leaf, index)
    return result


def stack(params: Mapping[Path, Any], only: set[tuple[Path, Path]] | None = None) -> dict[Path, Any]:
    """`params` with the per-layer block parameters stacked (of the (blocks prefix, name) pairs in `only`, or
    all); ValueError when a stacked parameter's layers are not exactly 0..n-1."""
    result: dict[Path, Any] = {}
    groups: dict[tuple[Path, Path], dict[int, Any]] = {}
    for path, leaf in params.items():
        parts = _split(path)
        if parts is None or parts[1] is None or (only is not None and (parts[0], parts[2]) not in only):
            result[path] = leaf
            continue
        prefix, index, rest = parts
        groups.setdefault((prefix, rest), {})[index] = leaf
    for (prefix, rest), layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"cannot stack {'/'.join(map(str, (*prefix, '<i>', *rest)))}: layers "
                             f"{sorted(layers)} are not 0..{len(layers) - 1}")
        result[(*prefix, *rest)] = _stack([layers[index] for index in range(len(layers))])
    return result


def to_layout(params: Mapping[Path, Any], like: Mapping[Path, Any]) -> dict[Path, Any]:
    """`params` in the block layout of `like` (a flat tree of the target model): blocks that are stacked in
    `like` stacked, every other block per layer."""
    stacked_in_like = {(parts[0], parts[2]) for path in like
                       if (parts := _split(path)) is not None and parts[1] is None}
    return stack(unstack(params), only=stacked_in_like)
