"""Hosted mode: what a public server (a Hugging Face Space, or ``COMPOSER_HOSTED=1``) lets a
visitor name. Only the bundled zoo, Hub ids and files the visitor uploaded in this request
(``UPLOADS``) resolve; any other reference gets the same refusal whether or not such a path
exists on the server, so messages reveal nothing about its disk (issue 20)."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path

from composer.recipe import RecipeError


def active() -> bool:
    """Hosted mode (on a Hugging Face Space, or ``COMPOSER_HOSTED=1``): references may name only
    the bundled zoo, Hub ids and files this request's visitor uploaded (``UPLOADS``), never
    another path on the server's disk; the refusal reads the same whether such a path exists."""
    flag = os.environ.get("COMPOSER_HOSTED", "").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    return flag in ("1", "true", "yes") or bool(os.environ.get("SPACE_ID"))


UPLOADS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "UPLOADS", default=frozenset()
)
"""Absolute paths of the files the current request's visitor uploaded: the only local files a
hosted server reads (the page sets it for the request)."""


def refusal(reference: str, where: str, kind: str, names: str) -> RecipeError:
    return RecipeError(
        f"{where}: {reference!r} is not available on this server; expected a bundled {kind} "
        f"({names or 'none bundled'}) or a Hub id (owner/name)"
    )


def uploaded(reference: str) -> bool:
    try:
        return str(Path(reference).resolve()) in UPLOADS.get()
    except (OSError, ValueError):
        return False
