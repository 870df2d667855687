"""``method: superpose`` through the engine: recipes in, images and κ traces out."""

import numpy as np
import pytest

from composer import engine, registry
from composer.recipe import RecipeError, parse


def superpose(experts, cache, mode="or", temperature=1.0, **sampler):
    recipe = parse(
        {
            "prompt": "a shape",
            "method": "superpose",
            "experts": experts,
            "superpose": {"mode": mode, "temperature": temperature, "bias": None},
            "sampler": {"steps": 4, "guidance_scale": 3.0, "seed": 3, **sampler},
        },
        check=registry.check_reference,
    )
    return engine.generate(recipe, cache=cache)


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def test_two_prompts_on_one_model_give_images_and_a_kappa_trace(tiny_sd1, cache):
    experts = [
        {"model": tiny_sd1, "prompt": "a red shape"},
        {"model": tiny_sd1, "prompt": "a circle"},
    ]
    result = superpose(experts, cache, num_images=2)
    assert len(result.images) == 2 and result.images[0].size == (16, 16)
    assert result.seeds == [3, 4]
    steps = result.trace[0]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(len(s["kappa"]) == 2 and abs(sum(s["kappa"]) - 1) < 1e-9 for s in steps)
    assert "Sampler: SuperDiff Euler-Maruyama" in result.metadata[0].chunks[0][1].decode()


def test_same_recipe_same_pixels_and_modes_differ(tiny_sd1, tiny_sd1_other, cache):
    experts = [{"model": tiny_sd1}, {"model": tiny_sd1_other}]
    a, b = superpose(experts, cache), superpose(experts, cache)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    both = superpose(experts, cache, mode="and")
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(both.images[0]))


def test_baselines_run_from_a_recipe(tiny_sd1, cache):
    experts = [
        {"model": tiny_sd1, "prompt": "a red shape"},
        {"model": tiny_sd1, "prompt": "a circle"},
    ]
    average = superpose(experts, cache, mode="average")
    assert all(s["kappa"] == pytest.approx([0.5, 0.5]) for s in average.trace[0])
    joint = superpose(experts, cache, mode="joint")  # one prompt: "a red shape and a circle"
    assert all(s["kappa"] == [1.0] for s in joint.trace[0])
    assert not np.array_equal(np.asarray(average.images[0]), np.asarray(joint.images[0]))


def test_sd1_with_sdxl_is_refused_naming_both(tiny_sd1, tiny_sdxl, cache):
    with pytest.raises(RecipeError) as info:
        superpose([{"model": tiny_sd1}, {"model": tiny_sdxl}], cache)
    message = str(info.value)
    assert "SDXL latents cannot be superposed with SD 1.x/2.x latents" in message
    assert tiny_sd1 in message and tiny_sdxl in message


def pixels(result):
    return np.asarray(result.images[0]).astype(int)


def test_lora_variants_of_one_model_each_run_with_their_own_lora(tiny_sd1, tiny_lora, cache):
    """Two experts on one model, one with a LoRA: each must run with its own adapters.

    With fixed weights softmax(±50) the drift is one expert's alone (the other's κ is e⁻¹⁰⁰), so
    the image must be the one that expert makes when both experts are it (no adapter switching
    there), and the two choices must differ (the LoRA changes the U-Net's output).
    """
    lora = {"model": tiny_sd1, "loras": [{"path": tiny_lora, "weight": 1.0}]}
    plain = {"model": tiny_sd1}

    def run(experts, bias):
        recipe = parse(
            {
                "prompt": "a shape",
                "method": "superpose",
                "experts": experts,
                "superpose": {"mode": "average", "bias": bias},
                "sampler": {"steps": 4, "guidance_scale": 3.0, "seed": 3},
            },
            check=registry.check_reference,
        )
        return pixels(engine.generate(recipe, cache=cache))

    single = parse(
        {"prompt": "a shape", "experts": [plain], "sampler": {"steps": 4, "seed": 3}},
        check=registry.check_reference,
    )
    before = pixels(engine.generate(single, cache=cache))
    lora_first = run([lora, plain], [50.0, -50.0])
    plain_second = run([lora, plain], [-50.0, 50.0])
    assert np.abs(lora_first - run([lora, lora], [50.0, -50.0])).max() <= 2
    assert np.abs(plain_second - run([plain, plain], [-50.0, 50.0])).max() <= 2
    assert np.abs(lora_first - plain_second).max() > 10
    # the variant request leaves no adapter active for the next request on that model
    assert np.array_equal(before, pixels(engine.generate(single, cache=cache)))


def test_too_many_lora_variants_on_one_model_are_refused(tiny_sd1, tiny_lora, cache, monkeypatch):
    monkeypatch.setattr(registry, "MAX_ADAPTERS", 0)
    experts = [
        {"model": tiny_sd1, "loras": [{"path": tiny_lora, "weight": 1.0}]},
        {"model": tiny_sd1},
    ]
    with pytest.raises(RecipeError, match="different LoRAs; at most 0 per model"):
        superpose(experts, cache)


def test_temperature_null_is_the_guidance_scale(tiny_sd1, cache):
    experts = [
        {"model": tiny_sd1, "prompt": "a red shape"},
        {"model": tiny_sd1, "prompt": "a circle"},
    ]
    follows = superpose(experts, cache, temperature=None)
    explicit = superpose(experts, cache, temperature=3.0)  # the sampler's guidance_scale
    assert follows.trace[0] == explicit.trace[0]
    assert np.array_equal(np.asarray(follows.images[0]), np.asarray(explicit.images[0]))
    unit = superpose(experts, cache, temperature=1.0)
    assert unit.trace[0][-1]["kappa"] != follows.trace[0][-1]["kappa"]
