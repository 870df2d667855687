"""Links that open the page on a generation: ``…/?id=<id>`` (an entry of
``composer.sharing.store``) and the stateless ``…/?recipe=<value>``, where the value is the
recipe's compact JSON, zlib-compressed and base64url-encoded without padding, so that a link
keeps working where no storage persists (free Spaces lose their disk on restart).

A link's recipe goes through ``composer.recipe.parse`` like every other recipe; what can go wrong
with the value itself (too long, cut short, not ours) is a ``RecipeError`` that names it.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from urllib.parse import urlencode, urlsplit, urlunsplit

from composer.recipe import Recipe, RecipeError, parse
from composer.untrusted import MAX_BYTES

MAX_LINK_CHARS = 4000
"""Longest ``recipe=`` value. Proxies and servers commonly refuse request lines beyond 8 KB, and
on a Space the app's iframe URL carries a signed token of about 1 KB besides the query."""
MAX_RECIPE_BYTES = MAX_BYTES
"""Largest recipe JSON that a link or the share store accepts (a real recipe is a few KB); also
bounds what a link's compressed value may inflate to."""
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def encode_recipe(recipe: Recipe) -> str:
    """The ``recipe=`` value of ``recipe``; ``RecipeError`` when it exceeds ``MAX_LINK_CHARS``,
    naming the stored link as the way to share it."""
    data = recipe.to_json(indent=None).encode("utf-8")
    value = base64.urlsafe_b64encode(zlib.compress(data, 9)).rstrip(b"=").decode("ascii")
    if len(value) > MAX_LINK_CHARS:
        raise RecipeError(
            f"recipe link: this recipe takes {len(value)} characters in a link, more than the "
            f"{MAX_LINK_CHARS} a link can safely carry; share it as a stored link (?id=) instead"
        )
    return value


def decode_recipe(value: str) -> Recipe:
    """A ``recipe=`` value → the parsed ``Recipe``. The length is checked before any decoding,
    and inflating stops at ``MAX_RECIPE_BYTES``, so a hostile value costs no more than that."""
    if len(value) > MAX_LINK_CHARS:
        raise RecipeError(
            f"recipe link: the value has {len(value)} characters; at most {MAX_LINK_CHARS} are "
            "accepted (longer recipes are shared as stored links, ?id=)"
        )
    if not _BASE64URL.fullmatch(value) or len(value) % 4 == 1:
        raise RecipeError(
            f"recipe link: {_preview(value)} is not accepted; expected base64url text "
            "(A-Z, a-z, 0-9, '-', '_') as the page's Share button writes it"
        )
    try:
        packed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        inflate = zlib.decompressobj()
        data = inflate.decompress(packed, MAX_RECIPE_BYTES + 1)
    except (binascii.Error, zlib.error):
        raise RecipeError(
            f"recipe link: {_preview(value)} is not a compressed recipe; was the link copied whole?"
        ) from None
    if len(data) > MAX_RECIPE_BYTES or inflate.unconsumed_tail:
        raise RecipeError(
            f"recipe link: the recipe inflates to more than {MAX_RECIPE_BYTES} bytes; at most "
            f"{MAX_RECIPE_BYTES} are accepted"
        )
    if not inflate.eof:
        raise RecipeError("recipe link: the value is cut short; was the link copied whole?")
    return parse(data)


def recipe_link(base: str, recipe: Recipe) -> str:
    """The stateless link to ``recipe`` on the page at ``base``."""
    return _with_query(base, "recipe", encode_recipe(recipe))


def share_link(base: str, share_id: str) -> str:
    """The link to the stored entry ``share_id`` on the page at ``base``."""
    return _with_query(base, "id", share_id)


def _with_query(base: str, key: str, value: str) -> str:
    """``http://host:7860`` → ``http://host:7860/?key=value``; a base with a path (a Space's page,
    ``https://huggingface.co/spaces/owner/name``) keeps it as it is."""
    scheme, netloc, path, _, _ = urlsplit(base)
    return urlunsplit((scheme, netloc, path or "/", urlencode({key: value}), ""))


def _preview(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")
