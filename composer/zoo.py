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


USER_FOLDERS = {"loras": "COMPOSER_LORA_DIR", "embeddings": "COMPOSER_EMBEDDING_DIR"}
"""The environment variables naming the user's own folders of LoRAs and embeddings, as
AUTOMATIC1111's ``models/Lora`` and ``embeddings`` (point them there to share one folder)."""


def user_files(kind: str) -> dict[str, Path]:
    """The ``.safetensors`` files in the user's folder of ``kind`` ("loras" or "embeddings"),
    subfolders included, by file name without its suffix, as A1111 names them in
    ``<lora:NAME>`` and by embedding token; the first by sorted path wins a clash. Empty when
    the variable is unset, or names no folder."""
    folder = os.environ.get(USER_FOLDERS[kind], "")
    if not folder or not Path(folder).expanduser().is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).expanduser().rglob("*.safetensors")):
        if path.is_file() and not any(part.startswith(".") for part in path.parts):
            found.setdefault(path.stem, path.resolve())
    return found
