"""``method: aggregate`` through the engine: recipes in, images and aggregation traces out."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from composer import engine, registry
from composer.recipe import RecipeError, parse
from pipelines.aggregation import Aggregator


def aggregate(experts, cache, aggregator=None, prompt="a red circle", **sampler):
    recipe = parse(
        {
            "prompt": prompt,
            "method": "aggregate",
            "experts": experts,
            "aggregate": {"aggregator": aggregator},
            "sampler": {"steps": 3, "guidance_scale": 3.0, "seed": 5, **sampler},
        },
        check=registry.check_reference,
    )
    return engine.generate(recipe, cache=cache)


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


@pytest.fixture(scope="module")
def trained_for_pair(tiny_sd1, tiny_sd1_other, tmp_path_factory):
    """An aggregator bound to (tiny_sd1, tiny_sd1_other), with non-uniform weights."""
    unets = [StableDiffusionPipeline.from_pretrained(p).unet for p in (tiny_sd1, tiny_sd1_other)]
    aggregator = Aggregator.for_unets(unets, ["sd1", "sd1-other"], width=8, heads=2, groups=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sabw in aggregator.points:
            sabw.proj_out.bias.copy_(torch.randn(2, generator=gen))
    folder = tmp_path_factory.mktemp("aggregator") / "pair"
    aggregator.save_pretrained(folder)
    return str(folder)


def test_uniform_averaging_without_an_aggregator(tiny_sd1, tiny_sd1_other, cache):
    result = aggregate([{"model": tiny_sd1}, {"model": tiny_sd1_other}], cache, num_images=2)
    assert len(result.images) == 2 and result.images[0].size == (16, 16)
    steps = result.trace[0]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert set(steps[0]["aggregation"]) >= {"conv_in", "mid", "head"}
    assert all(w == [0.5, 0.5] for s in steps for w in s["aggregation"].values())
    again = aggregate([{"model": tiny_sd1}, {"model": tiny_sd1_other}], cache, num_images=2)
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(again.images[1]))


def test_a_bound_aggregator_runs_and_changes_the_image(
    tiny_sd1, tiny_sd1_other, trained_for_pair, cache
):
    experts = [{"model": tiny_sd1}, {"model": tiny_sd1_other}]
    result = aggregate(experts, cache, aggregator=trained_for_pair)
    weights = result.trace[0][0]["aggregation"]["mid"]
    assert sum(weights) == pytest.approx(1, abs=1e-3) and abs(weights[0] - 0.5) > 0.01
    maps = result.maps[0]
    assert maps["conv_in"].shape == (2, 8, 8) and maps["head"].shape == (2, 8, 8)
    assert maps["mid"].shape[0] == 2 and maps["mid"].shape[1:] == (4, 4)
    torch.testing.assert_close(maps["mid"].sum(0), torch.ones(4, 4), atol=2e-3, rtol=0)
    mean_over_steps = np.mean([s["aggregation"]["mid"][0] for s in result.trace[0]])
    assert float(maps["mid"][0].mean()) == pytest.approx(mean_over_steps, abs=2e-3)
    uniform = aggregate(experts, cache)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(uniform.images[0]))


def test_experts_read_their_prompts_and_the_aggregators_the_recipes(
    tiny_sd1, tiny_sd1_other, tmp_path, cache
):
    """With prompts of their own on the experts, the recipe's prompt is what the aggregators
    read: swapping its order changes a trained aggregator's image and not uniform averaging's."""
    unets = [StableDiffusionPipeline.from_pretrained(p).unet for p in (tiny_sd1, tiny_sd1_other)]
    aggregator = Aggregator.for_unets(unets, ["sd1", "sd1-other"], width=8, heads=2, groups=4)
    with torch.no_grad():  # weights that depend on the prompt (a bias alone would not)
        for sabw in aggregator.points:
            sabw.proj_out.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    aggregator.save_pretrained(tmp_path / "reads-prompt")
    experts = [
        {"model": tiny_sd1, "prompt": "a red circle"},
        {"model": tiny_sd1_other, "prompt": "a blue square"},
    ]
    images = {}
    for folder in (str(tmp_path / "reads-prompt"), None):
        for whole in ("a red circle and a blue square", "a blue square and a red circle"):
            result = aggregate(experts, cache, aggregator=folder, prompt=whole)
            images[folder is not None, whole] = np.asarray(result.images[0]).astype(int)
    trained = [v for (k, _), v in images.items() if k]
    uniform = [v for (k, _), v in images.items() if not k]
    assert np.abs(trained[0] - trained[1]).max() > 0
    assert np.array_equal(uniform[0], uniform[1])


def test_aggregator_for_other_experts_is_refused(tiny_sd1, tiny_sd1_other, trained_for_pair, cache):
    with pytest.raises(RecipeError, match=r"trained for sd1, sd1-other in that order; expert 1"):
        aggregate([{"model": tiny_sd1_other}, {"model": tiny_sd1}], cache, trained_for_pair)


def test_mismatched_architectures_and_loras_are_refused(tiny_sd1, tiny_sdxl, tiny_lora, cache):
    with pytest.raises(RecipeError, match="different architectures: addition_embed_type"):
        aggregate([{"model": tiny_sd1}, {"model": tiny_sdxl}], cache)
    with pytest.raises(RecipeError, match="LoRAs on the experts of an aggregate"):
        aggregate([{"model": tiny_sd1, "loras": [{"path": tiny_lora}]}, {"model": tiny_sd1}], cache)
    with pytest.raises(RecipeError, match="unknown aggregator 'nope'"):
        aggregate([{"model": tiny_sd1}, {"model": tiny_sd1}], cache, aggregator="nope")


@pytest.mark.parametrize("scheduler", ["unipc", "dpmpp_2m_karras", "ddim", "euler_a"])
def test_aggregation_runs_with_schedulers_that_take_no_generator(
    tiny_sd1, tiny_sd1_other, cache, scheduler
):
    """UniPC and DPM-Solver++ multistep take no ``generator`` in ``step`` (a TypeError before);
    the stochastic ones still draw their step noise from the seed."""
    recipe = {
        "prompt": "a",
        "method": "aggregate",
        "experts": [{"model": tiny_sd1}, {"model": tiny_sd1_other}],
        "sampler": {"scheduler": scheduler, "steps": 3, "seed": 4, "num_images": 2},
    }
    first = engine.generate(parse(recipe), cache=cache)
    again = engine.generate(parse(recipe), cache=cache)
    assert len(first.images) == 2
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
