"""AUTOMATIC1111's ``parameters`` text: what we write reads back, and what A1111 writes reads in."""

import json

import pytest
from PIL import Image, PngImagePlugin

from composer.__main__ import main
from composer.recipe import parse
from composer.sharing.pnginfo import a1111_fields, a1111_parameters, from_a1111, read_recipe

# Written the way A1111 1.6–1.10 write them (modules/processing.py create_infotext).
SAMPLES = [
    (
        "masterpiece, best quality, 1girl, <lora:add_detail:0.6>, looking at viewer\n"
        "cherry blossoms, <lyco:film_grain>\n"
        "Negative prompt: (worst quality, low quality:1.4), easynegative,\n"
        "bad hands, extra fingers\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2233445566, "
        "Size: 512x768, Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, "
        "Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, "
        'Lora hashes: "add_detail: 7c6bad76eb54, film_grain: 0123456789ab", '
        'TI hashes: "easynegative: c74b4e810b03", Version: v1.7.0'
    ),
    (
        "a photo of an astronaut riding a horse on mars <lora:detail-tweaker-xl:1.2>\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 1024x1024, "
        "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, "
        'VAE: sdxl_vae.safetensors, Lora hashes: "detail-tweaker-xl: 0d9bd1b873a7", '
        "Version: v1.6.0"
    ),
    (
        "portrait of a knight, intricate armor\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    ),
]


def test_real_a1111_texts_read_into_recipes():
    first, second, third = (parse(from_a1111(text)) for text in SAMPLES)

    assert first.negative_prompt == (
        "(worst quality, low quality:1.4), easynegative,\nbad hands, extra fingers"
    )
    assert [(lo.path, lo.weight) for lo in first.expert_loras(0)] == [
        ("add_detail", 0.6),
        ("film_grain", 1.0),
    ]
    assert "<lora" not in first.expert_prompt(0) and "cherry blossoms" in first.expert_prompt(0)
    s = first.sampler
    assert (s.scheduler, s.steps, s.guidance_scale, s.seed) == (
        "dpmpp_2m_karras",
        28,
        6.5,
        2233445566,
    )
    assert (s.width, s.height, first.experts[0].model) == (512, 768, "anything-v5")

    assert second.sampler.scheduler == "dpmpp_2m_karras" and second.sampler.width == 1024
    assert second.experts[0].model == "sd_xl_base_1.0"
    assert [(lo.path, lo.weight) for lo in second.expert_loras(0)] == [("detail-tweaker-xl", 1.2)]

    assert third.prompt == "portrait of a knight, intricate armor" and third.negative_prompt == ""
    assert (third.sampler.scheduler, third.sampler.guidance_scale) == ("euler_a", 7.5)


def test_settings_line_is_split_as_a1111_splits_it():
    _, _, settings = a1111_fields(SAMPLES[0])
    assert settings["Lora hashes"] == "add_detail: 7c6bad76eb54, film_grain: 0123456789ab"
    assert settings["TI hashes"] == "easynegative: c74b4e810b03"
    assert settings["Clip skip"] == "2"


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_our_text_reads_back_into_the_same_generation(scheduler):
    recipe = parse(
        {
            "prompt": "a red circle, <lora:toy-cool:0.3> on grass",
            "negative_prompt": "blurry,\nlow quality",
            "experts": [{"model": "toy-warm", "loras": [{"path": "toy-purple", "weight": 0.8}]}],
            "sampler": {
                "scheduler": scheduler,
                "steps": 17,
                "guidance_scale": 6.5,
                "seed": 99,
                "width": 64,
                "height": 48,
                "num_images": 3,
            },
        }
    )
    back = parse(from_a1111(a1111_parameters(recipe, index=2)))
    assert back.expert_prompt(0) == recipe.expert_prompt(0)
    assert back.negative_prompt == recipe.negative_prompt
    assert set(back.expert_loras(0)) == set(recipe.expert_loras(0))
    s, r = back.sampler, recipe.sampler
    assert (s.scheduler, s.steps, s.guidance_scale) == (r.scheduler, r.steps, r.guidance_scale)
    assert (s.seed, s.width, s.height) == (r.seed + 2, r.width, r.height)
    assert back.experts[0].model == "toy-warm"


def test_what_a_recipe_cannot_hold_is_left_at_its_default():
    text = (
        "a cat\nSteps: 500, Sampler: DPM++ 3M SDE Exponential, CFG scale: 7, Seed: 5, "
        "Size: 500x333, Version: v1.9.0"
    )
    recipe = parse(from_a1111(text))
    assert (recipe.sampler.scheduler, recipe.sampler.steps) == ("euler", 20)
    assert recipe.sampler.width is None and recipe.sampler.seed == 5


def a1111_png(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_png_from_a1111_reads_and_composer_info_prints_it(tmp_path, capsys):
    path = a1111_png(tmp_path / "a1111.png", SAMPLES[2])
    assert read_recipe(path).sampler.seed == 1234
    assert main(["info", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt"] == "portrait of a knight, intricate armor"
    assert printed["experts"][0]["model"] == "v1-5-pruned-emaonly"


def test_settings_a_recipe_cannot_hold_are_named_by_composer_info_and_the_page(tmp_path, capsys):
    """No silent changes: an A1111 image's Clip skip, hires fix and VAE are not carried into
    the recipe, and both ``composer info`` and a PNG dropped on the page say which."""
    from composer.sharing.pnginfo import not_carried
    from ui.handlers import restore_from_png

    first = a1111_png(tmp_path / "first.png", SAMPLES[0])
    assert not_carried(first) == [
        "Denoising strength", "Clip skip", "Hires upscale", "Hires upscaler"
    ]  # fmt: skip
    assert not_carried(a1111_png(tmp_path / "second.png", SAMPLES[1])) == ["VAE"]
    assert not_carried(a1111_png(tmp_path / "third.png", SAMPLES[2])) == []
    assert main(["info", str(first)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == (
        "note: not carried over from its parameters: Denoising strength, Clip skip, "
        "Hires upscale, Hires upscaler"
    )
    with Image.open(first) as image:
        image.load()
        status = restore_from_png(image)["status"]
    assert "not carried over" in status and "Clip skip" in status
