"""A recipe's images in batches (issue 18): each image as its seed alone makes it (within float
rounding), its PNG re-made exactly, the batch sized to memory and halved on out-of-memory."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from composer import engine, registry
from composer.methods import batches
from composer.recipe import RecipeError, parse
from composer.sharing.pnginfo import png_bytes, read_recipe


@pytest.fixture
def cache():
    return registry.ModelCache()


def recipe_of(method: str, sd1: str, other: str, **sampler) -> dict:
    experts = {
        "single": [{"model": sd1}],
        "merge": [{"model": sd1}, {"model": other, "weight": 2.0}],
        "superpose": [{"model": sd1}, {"model": sd1, "prompt": "b"}],
        "aggregate": [{"model": sd1}, {"model": other}],
    }[method]
    sampler = {"scheduler": "euler_a", "steps": 3, "seed": 11, "num_images": 3, **sampler}
    return {"prompt": "a", "method": method, "experts": experts, "sampler": sampler}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("method", ["single", "merge", "superpose", "aggregate"])
def test_each_image_of_a_batch_is_its_seed_alone_and_its_png_remakes_it_exactly(
    method, tiny_sd1, tiny_sd1_other, cache
):
    batched = engine.generate(parse(recipe_of(method, tiny_sd1, tiny_sd1_other)), cache=cache)
    alone = engine.generate(
        parse(recipe_of(method, tiny_sd1, tiny_sd1_other, batch_size=1)), cache=cache
    )
    assert batched.batch_size == 3 and alone.batch_size == 1
    assert batched.recipe.sampler.batch_size == 3  # what Re-run and Share store
    assert batched.seeds == alone.seeds == [11, 12, 13]
    for a, b in zip(batched.images, alone.images, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    for i, (image, info) in enumerate(zip(batched.images, batched.metadata, strict=True)):
        png = png_bytes(image, info)
        again = read_recipe(Image.open(BytesIO(png)))
        assert (again.sampler.seed, again.sampler.num_images, again.sampler.batch_size) == (
            11,
            3,
            3,
        )
        remade = engine.generate(again, cache=cache).images[i]
        assert (pixels(remade) == pixels(image)).all()
        with Image.open(BytesIO(png)) as opened:
            text = opened.info["parameters"]
        assert f"Seed: {11 + i}, " in text and f"Batch size: 3, Batch pos: {i}, " in text
    per_image = [len(steps) for steps in batched.trace]
    assert per_image == [3, 3, 3]


def test_an_image_made_alone_carries_the_recipe_of_itself_alone(tiny_sd1, cache):
    result = engine.generate(
        parse(recipe_of("single", tiny_sd1, tiny_sd1, batch_size=1)), cache=cache
    )
    again = read_recipe(Image.open(BytesIO(png_bytes(result.images[2], result.metadata[2]))))
    assert (again.sampler.seed, again.sampler.num_images, again.sampler.batch_size) == (13, 1, None)
    assert "batch_size" not in again.to_dict()["sampler"]  # as recipes were before batches


def test_the_batch_holds_what_half_the_free_memory_holds(tiny_sd1, cache, monkeypatch):
    recipe = parse(recipe_of("single", tiny_sd1, tiny_sd1, num_images=5, width=32, height=32))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    per_image = batches.activation_bytes(pipe, 32, 32) * 2  # CFG's two halves
    monkeypatch.setattr(batches, "free_bytes", lambda device: 4 * per_image + 1)
    assert engine.generate(recipe, cache=cache).batch_size == 2
    monkeypatch.setattr(batches, "free_bytes", lambda device: 0)
    assert engine.generate(recipe, cache=cache).batch_size == 1


def test_out_of_memory_halves_the_batch_once_then_says_so(tiny_sd1, cache, monkeypatch):
    calls = []
    real = StableDiffusionPipeline.__call__

    def limited(self, *args, **kwargs):
        calls.append(kwargs["num_images_per_prompt"])
        if kwargs["num_images_per_prompt"] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", limited)
    recipe = parse(recipe_of("single", tiny_sd1, tiny_sd1, num_images=4, batch_size=4))
    limit = 2
    result = engine.generate(recipe, cache=cache)
    assert calls == [4, 2, 2] and result.batch_size == 2 and len(result.images) == 4
    assert result.recipe.sampler.batch_size == 2
    calls.clear()
    limit = 1
    with pytest.raises(RecipeError, match=r"out of memory with 2 image\(s\) .* after halving"):
        engine.generate(recipe, cache=cache)
    assert calls == [4, 2]
