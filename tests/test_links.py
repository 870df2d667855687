import base64
import json
import math
import random
import string
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest

from composer.recipe import RecipeError, parse
from composer.sharing.links import (
    MAX_LINK_CHARS,
    decode_recipe,
    encode_recipe,
    recipe_link,
    share_link,
)

SAMPLER = {"scheduler": "dpmpp_2m_karras", "steps": 12, "guidance_scale": 6.5, "seed": 42}
RECIPES = {
    "single": {
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "experts": [{"model": "toy-warm", "loras": [{"path": "toy-purple", "weight": 0.8}]}],
        "sampler": {**SAMPLER, "width": 64, "height": 48, "num_images": 4},
    },
    "merge": {
        "prompt": "a blue square",
        "method": "merge",
        "experts": [{"model": "toy-warm", "weight": 0.7}, {"model": "toy-cool", "weight": 0.3}],
        "merge": {
            "method": "ties",
            "base": "toy-base",
            "density": 0.35,
            "lambda": 1.25,
            "block_weights": [1.0, 0.5, 0.0],
            "overrides": [{"pattern": r"attentions\.\d+\.", "weight": 0.5}],
            "sign_rule": "count",
            "trim_scope": "model",
        },
        "sampler": SAMPLER,
    },
    "superpose": {
        "prompt": "",
        "method": "superpose",
        "experts": [
            {"model": "toy-warm", "prompt": "a red shape"},
            {"model": "toy-warm", "prompt": "a circle", "loras": [{"path": "toy-star"}]},
        ],
        "superpose": {"mode": "or", "temperature": 0.5, "bias": [0.0, math.log(3)]},
        "sampler": SAMPLER,
    },
    "aggregate": {
        "prompt": "a yellow triangle",
        "method": "aggregate",
        "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
        "aggregate": {"aggregator": "toy-warm-cool"},
        "sampler": SAMPLER,
    },
}


@pytest.mark.parametrize("method", RECIPES)
def test_a_recipe_link_round_trips_every_method(method):
    recipe = parse(RECIPES[method])
    link = recipe_link("http://127.0.0.1:7860", recipe)
    (value,) = parse_qs(urlsplit(link).query)["recipe"]
    assert link.startswith("http://127.0.0.1:7860/?recipe=")
    assert decode_recipe(value) == recipe
    assert recipe.method == method and len(value) < 800


def test_the_value_is_the_recipe_json_zlib_compressed_in_unpadded_base64url():
    recipe = parse(RECIPES["superpose"])
    value = encode_recipe(recipe)
    assert "=" not in value and set(value) <= set(string.ascii_letters + string.digits + "-_")
    packed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    assert json.loads(zlib.decompress(packed)) == recipe.to_dict()


def test_a_recipe_too_long_for_a_link_names_the_stored_link_instead():
    rng = random.Random(0)
    prompts = ["".join(rng.choices(string.ascii_letters, k=2000)) for _ in range(4)]
    recipe = parse(
        {
            "prompt": prompts[0],
            "method": "superpose",
            "experts": [{"model": "toy-warm", "prompt": p} for p in prompts[1:]],
        }
    )
    with pytest.raises(RecipeError, match=rf"more than the {MAX_LINK_CHARS} .* stored link"):
        encode_recipe(recipe)
    with pytest.raises(RecipeError, match=rf"4001 characters; at most {MAX_LINK_CHARS}"):
        decode_recipe("A" * 4001)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", r"'not base64!' is not accepted; expected base64url"),
        ("AAAAA", "is not accepted; expected base64url"),  # no base64 text has 4k + 1 characters
        ("AAAAAAAA", "is not a compressed recipe"),
        ("", "cut short"),
    ],
)
def test_a_malformed_value_is_a_clear_error(value, message):
    with pytest.raises(RecipeError, match=message):
        decode_recipe(value)


def test_a_value_cut_short_is_a_clear_error():
    value = encode_recipe(parse(RECIPES["merge"]))
    with pytest.raises(RecipeError, match="the value is cut short; was the link copied whole"):
        decode_recipe(value[: len(value) // 8 * 4])


def test_a_value_that_inflates_beyond_the_limit_is_refused():
    bomb = base64.urlsafe_b64encode(zlib.compress(b" " * 2_000_000, 9)).rstrip(b"=").decode()
    assert len(bomb) <= MAX_LINK_CHARS
    with pytest.raises(RecipeError, match="inflates to more than 262144 bytes"):
        decode_recipe(bomb)


def test_a_link_recipe_goes_through_the_recipe_parser():
    value = base64.urlsafe_b64encode(zlib.compress(b'{"experts": []}')).rstrip(b"=").decode()
    with pytest.raises(RecipeError, match=r"recipe\.prompt: missing"):
        decode_recipe(value)


def test_links_keep_the_path_of_a_spaces_page():
    assert share_link("http://127.0.0.1:7860", "Ab3_-xYz0123") == (
        "http://127.0.0.1:7860/?id=Ab3_-xYz0123"
    )
    assert share_link("https://huggingface.co/spaces/owner/name", "Ab3_-xYz0123") == (
        "https://huggingface.co/spaces/owner/name?id=Ab3_-xYz0123"
    )
