"""The one door for untrusted text: every recipe (CLI file, page, API argument, link, PNG chunk,
stored entry) is read by ``load_json`` or, when it arrives as Python objects, checked by
``check_tree`` before any field is looked at (``composer.recipe.parse`` calls both).

Bounds, each a ``RecipeError`` that names where it was hit:

- size: at most ``MAX_BYTES`` of text (the share store's entry limit for a recipe);
- depth: at most ``MAX_DEPTH`` nested arrays/objects, checked by a scan *before* ``json.loads``
  (whose recursion would otherwise end in ``RecursionError`` at ~1,000 levels);
- numbers: at most ``MAX_NUMBER_CHARS`` characters (Python refuses int conversion of more than
  4,300 digits with a ``ValueError``, and nothing in a recipe needs more than a seed's 20 digits);
  ``NaN`` and ``Infinity`` are not JSON and are refused;
- text: no lone surrogates (``"\\ud800"`` decodes from JSON but is not Unicode text; the tokenizer
  fails on it later), no NUL.
"""

from __future__ import annotations

import json
from typing import Any

from composer.recipe import RecipeError

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40


def load_json(text: str | bytes, where: str = "recipe", source: str | None = None) -> Any:
    """``json.loads`` within the bounds above; every failure is a one-line ``RecipeError``
    starting with ``where`` (and naming ``source``, a file, where the text came from one)."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_BYTES:
            raise _too_big(where, len(text))
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if len(text) > MAX_BYTES:
        raise _too_big(where, len(text))
    _check_depth(text, where)
    try:
        data = json.loads(
            text,
            parse_int=lambda s: _number(s, int, where),
            parse_float=lambda s: _number(s, float, where),
            parse_constant=lambda s: _not_json(s, where),
        )
    except json.JSONDecodeError as e:
        what = f"{source} is not" if source else "not"
        raise RecipeError(f"{where}: {what} valid JSON ({e})") from None
    check_tree(data)
    return data


def check_tree(data: Any, where: str = "", depth: int = 0) -> None:
    """Depth, number and text bounds on already-decoded JSON-like data (dicts from Python
    callers); names the first offending field as the recipe's messages do,
    ``experts[0].prompt``. Whether a number is finite is the field's own check."""
    if depth > MAX_DEPTH:
        raise RecipeError(f"{where or 'recipe'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(data, str):
        _check_text(data, where or "recipe")
    elif isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise RecipeError(
                    f"{where or 'recipe'}: keys must be text, not {type(key).__name__}"
                )
            _check_text(key, f"{where or 'recipe'} (a key)")
            check_tree(value, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            check_tree(value, f"{where}[{i}]", depth + 1)
    elif isinstance(data, int) and data.bit_length() > 4 * MAX_NUMBER_CHARS:
        raise RecipeError(f"{where}: a number longer than {MAX_NUMBER_CHARS} digits")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise RecipeError(f"{where}: contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise RecipeError(
            f"{where}: contains a lone surrogate (\\u{code:04x}) at character {e.start}, "
            "which is not Unicode text"
        ) from None


def _check_depth(text: str, where: str) -> None:
    """The deepest nesting of ``[``/``{`` outside strings, without recursion."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _number(text: str, kind: type, where: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise RecipeError(
            f"{where}: a number of {len(text)} characters ({text[:12]}…); at most "
            f"{MAX_NUMBER_CHARS} are accepted"
        )
    return kind(text)


def _not_json(text: str, where: str):
    raise RecipeError(f"{where}: {text} is not a JSON number; use a finite number")


def _too_big(where: str, size: int) -> RecipeError:
    return RecipeError(f"{where}: {size} bytes of text; at most {MAX_BYTES} are accepted")
