"""jclip.losses: pure loss functions, one module per family, and the loss-term registry.

Importing this package imports every family module in it (contrastive, rank, soft, ...), so that each
registers its terms in `TERMS`; a method's terms are `@register_term(name, reads=...)` functions in a family module here, or in
any module the config imports (shared/ARCHITECTURE.md, principle 1). Modules whose names start with `_` are skipped.
"""

from __future__ import annotations

import importlib
import pkgutil

from jclip.losses.terms import (
    TERMS,
    LossContext,
    LossTerm,
    Reads,
    init_loss_state,
    outputs_read,
    register_term,
    term_reads,
    total_loss,
    total_loss_with_state,
    validate_terms_config,
)


def _import_families() -> None:
    """Imports the family modules of this package (sorted by name) so their terms register."""
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

from jclip.losses.contrastive import clip_loss, siglip_loss  # noqa: E402

__all__ = [
    "TERMS",
    "LossContext",
    "LossTerm",
    "Reads",
    "clip_loss",
    "init_loss_state",
    "outputs_read",
    "register_term",
    "siglip_loss",
    "term_reads",
    "total_loss",
    "total_loss_with_state",
    "validate_terms_config",
]
