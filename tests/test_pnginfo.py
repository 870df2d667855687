import json

import pytest
from PIL import Image

from composer.recipe import RecipeError, parse
from composer.sharing.pnginfo import a1111_parameters, png_info, read_recipe


def recipe(**sampler):
    return parse(
        {
            "prompt": "a red circle",
            "negative_prompt": "a blue square, blurry",
            "experts": [
                {
                    "model": "/models/warm.safetensors",
                    "loras": [
                        {"path": "toy-purple", "weight": 0.8},
                        {"path": "/l/star/pytorch_lora_weights.safetensors", "weight": 1},
                    ],
                }
            ],
            "sampler": {
                "scheduler": "euler_a",
                "steps": 20,
                "guidance_scale": 7,
                "seed": 10,
                "width": 64,
                "height": 32,
                "num_images": 4,
                **sampler,
            },
        }
    )


def test_a1111_parameters_have_prompt_with_lora_tags_negative_and_settings_line():
    text = a1111_parameters(
        recipe(),
        index=2,
        model_hashes={"/models/warm.safetensors": "ab" * 32},
        lora_hashes={"toy-purple": "cd" * 32},
    )
    lines = text.split("\n")
    assert lines[0] == "a red circle <lora:toy-purple:0.8> <lora:star:1>"
    assert lines[1] == "Negative prompt: a blue square, blurry"
    assert lines[2].startswith(
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 64x32, "
        "Model hash: ababababab, Model: warm, "
    )
    assert 'Lora hashes: "toy-purple: cdcdcdcdcdcd"' in lines[2]


def test_a1111_settings_line_parses_as_key_value_pairs():
    """What A1111's PNG Info does: split the last line on `, ` outside quotes, then on `: `."""
    line = a1111_parameters(recipe(), lora_hashes={"toy-purple": "cd" * 32}).split("\n")[-1]
    pairs, _key, buf, quoted = {}, None, "", False
    for ch in line + ", ":
        if ch == '"':
            quoted = not quoted
        buf += ch
        if not quoted and buf.endswith(", "):
            k, _, v = buf[:-2].partition(": ")
            pairs[k] = json.loads(v) if v.startswith('"') else v
            buf = ""
    assert pairs["Steps"] == "20" and pairs["Seed"] == "10" and pairs["Size"] == "64x32"
    assert pairs["Lora hashes"] == "toy-purple: cdcdcdcdcdcd"
    assert len(pairs) >= 3


def test_negative_prompt_line_is_omitted_when_empty():
    r = parse({"prompt": "a", "experts": [{"model": "toy-warm"}]})
    assert "Negative prompt" not in a1111_parameters(r)


def test_png_round_trip_gives_the_recipe_of_that_image(tmp_path):
    r = recipe()
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=png_info(r, index=3))
    back = read_recipe(path)
    assert back.sampler.seed == r.sampler.seed + 3
    assert back.sampler.num_images == 1
    assert back.to_dict() | {"sampler": None} == r.to_dict() | {"sampler": None}
    with Image.open(path) as im:
        assert im.info["parameters"].split("\n")[-1].count("Seed: 13") == 1


def test_png_without_recipe_or_not_an_image_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(RecipeError, match="carries no 'composer_recipe'"):
        read_recipe(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(RecipeError, match="not a readable image"):
        read_recipe(junk)


def test_size_is_the_images_own_and_hashes_are_written_as_a1111_writes_them():
    r = parse(
        {
            "prompt": "a red circle <lora:my,lora:0.5>",
            "experts": [{"model": "/models/warm.safetensors"}],
            "embeddings": [{"path": "/e/easyneg.safetensors"}],
        }
    )
    text = a1111_parameters(
        r,
        model_hashes={"/models/warm.safetensors": "0123456789abcdef" * 4},
        lora_hashes={"my,lora": "ef" * 32},
        ti_hashes={"easyneg": "98" * 32},
        size=(48, 40),
    )
    assert text.split("\n")[0] == "a red circle <lora:my,lora:0.5>"  # as written, no copy
    line = text.split("\n")[-1]
    assert "Size: 48x40" in line and "Model hash: 0123456789," in line  # AutoV2: 10 hex
    assert 'Lora hashes: "mylora: efefefefefef"' in line  # A1111 drops ':' and ','
    assert 'TI hashes: "easyneg: 989898989898"' in line
