"""Where the bundled zoo lives and what it holds, without loading anything: the command line's
``models`` listing imports this instead of ``composer.registry`` (which imports torch)."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(
    os.environ.get("COMPOSER_ASSETS") or Path(__file__).resolve().parent.parent / "assets"
)
"""The bundled zoo; ``COMPOSER_ASSETS`` points the app at another folder of the same layout
(``models/``, ``loras/``, ``aggregators/``, ``routers/``), e.g. a freshly trained zoo before it
is bundled."""


def bundled(kind: str) -> dict[str, Path]:
    """Bundled names of ``kind`` ("models", "loras", "aggregators" or "routers") → their
    folders."""
    folder = ASSETS / kind
    if not folder.is_dir():
        return {}
    return {
        p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
    }
