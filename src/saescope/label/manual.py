"""Manual labels: a person looks at a feature's examples and names what it responds to."""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..runs import Run
from .evidence import as_run, resolve_saes


def set_label(run: Run | str | Path, sae_ref: str | int, idx: int, text: str, author: str | None = None) -> int:
    """Make `text` the current human label of feature `idx` of SAE `sae_ref`; return its id.

    sae_ref: full id, "site/LAYER" or "LAYER". The previous human label stays in the
    history (FeatureDB.set_label); text is stored verbatim (escaping is the renderer's job).
    """
    if isinstance(idx, bool) or not isinstance(idx, int | str):
        raise SaescopeError(f"feature index must be a whole number, not {idx!r}")
    try:
        idx = int(idx)
    except ValueError as err:
        raise SaescopeError(f"feature index must be a whole number, not {idx!r}") from err
    run = as_run(run)
    if not run.db_path.is_file():
        raise SaescopeError(f"run {run.root} has not been analysed yet: run `saescope analyze {run.root}` "
                            "before labelling its features")
    with run.db() as db:
        (sae,) = resolve_saes(db, [sae_ref])
        width = sae["width"]
        if idx < 0 or (width and idx >= width):
            raise SaescopeError(f"feature {idx} is out of range for SAE {sae['id']!r} (width {width}): "
                                f"use 0..{(width or 1) - 1}")
        return db.set_label(sae["id"], idx, text, source="human", author=author)
