"""Captions of the toy world: full ("a red circle") and partial ("a red shape", "a circle",
"a shape"), so that a prompt can name the colour, the shape, both or neither."""

from __future__ import annotations

import re

from toyworld.render import COLORS, SHAPES

SPELLINGS = {"grey": "gray"}


def captions(color: str, shape: str) -> list[str]:
    """Every caption that is true of a ``color`` ``shape``, the most specific first."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return [f"a {color} {shape}", f"a {color} shape", f"a {shape}", "a shape"]


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """The (colour, shape) a caption names, ``None`` for each it leaves open.

    Measuring a prompt needs to know what it asked for; other words ("a", "shape", punctuation)
    are ignored, the first colour and first shape win, and "grey" is gray.
    """
    words = [SPELLINGS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


def scene_caption(left: tuple[str, str], right: tuple[str, str]) -> str:
    """The caption of a two-object scene: "a red circle and a blue square" (left object first)."""
    return f"{captions(*left)[0]} and {captions(*right)[0]}"


def parse_scene(text: str) -> list[tuple[str | None, str | None]]:
    """The (colour, shape) of each object a prompt names, in order: one per " and " part."""
    return [parse_caption(part) for part in re.split(r"\band\b", text.lower())]
