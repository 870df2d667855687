"""The sha256 that identifies a model or LoRA file, as AUTOMATIC1111 and Civitai show it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol


class Located(Protocol):
    """Where a model reference points (``composer.registry.Source``)."""

    kind: str
    location: str


def file_sha256(path: str | Path, body_only: bool = False) -> str:
    """sha256 of a file, or of a safetensors file's body after its header (the LoRA hash that
    AUTOMATIC1111 and Civitai show). Cached by (path, size, mtime): checkpoints are gigabytes."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, body_only)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if body_only:
                header = int.from_bytes(f.read(8), "little")
                f.seek(8 + header)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def model_file(source: Located) -> Path | None:
    """The file whose hash identifies a model (the U-Net weights of a folder)."""
    if source.kind == "single_file":
        return Path(source.location)
    if source.kind in ("bundled", "folder"):
        unet = Path(source.location) / "unet" / "diffusion_pytorch_model.safetensors"
        return unet if unet.is_file() else None
    return None
