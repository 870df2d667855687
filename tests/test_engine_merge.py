"""``method: merge`` through the engine: the live merge on tiny SD 1.x models."""

import json
import threading

import numpy as np
import pytest

from composer import engine, registry
from composer.recipe import RecipeError, parse


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def run(cache, experts, merge=None, method="merge", **sampler):
    recipe = parse(
        {
            "prompt": "a shape",
            "method": method,
            "experts": experts,
            **({"merge": merge} if merge else {}),
            "sampler": {"steps": 3, "seed": 5, **sampler},
        },
        check=registry.check_reference,
    )
    return engine.generate(recipe, cache=cache)


def pixels(result, i=0):
    return np.asarray(result.images[i]).astype(int)


def test_weighted_sum_of_a_model_with_itself_is_that_model(tiny_sd1, cache):
    alone = run(cache, [{"model": tiny_sd1}], method="single")
    merged = run(cache, [{"model": tiny_sd1, "weight": 0.3}, {"model": tiny_sd1, "weight": 0.7}])
    assert np.abs(pixels(alone) - pixels(merged)).max() <= 1


def test_ties_at_full_density_over_one_expert_gives_the_other(tiny_sd1, tiny_sd1_other):
    """τ₁ = 0 (the base itself), τ₂ = other − base: every entry's only agreeing task vector is
    τ₂, so the disjoint mean is τ₂ and the merged U-Net is the other model's."""
    import torch
    from diffusers import UNet2DConditionModel

    from composer.merge.live import merged_model
    from composer.merge.registry import Merge

    base = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    other = UNet2DConditionModel.from_pretrained(tiny_sd1_other, subfolder="unet")
    settings = Merge("ties", base="base", density=1.0)
    experts = [("base", {"unet": base}, 1.0), ("other", {"unet": other}, 1.0)]
    with merged_model(settings, experts, ("base", {"unet": base})) as m:
        assert m.seconds > 0
        merged = m.modules["unet"].state_dict()
        for name, value in other.state_dict().items():
            torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6)


def test_repeating_a_merge_reuses_it_and_sources_stay_untouched(tiny_sd1, tiny_sd1_other, cache):
    experts = [{"model": tiny_sd1}, {"model": tiny_sd1_other}]
    before = run(cache, [{"model": tiny_sd1}], method="single")
    first = run(cache, experts, {"method": "weighted_sum"})
    again = run(cache, experts, {"method": "weighted_sum"})
    assert again.merge_seconds == 0.0
    assert np.array_equal(pixels(first), pixels(again))
    assert np.array_equal(
        pixels(before), pixels(run(cache, [{"model": tiny_sd1}], method="single"))
    )


def test_two_requests_with_different_merges_never_mix(tiny_sd1, tiny_sd1_other, cache):
    experts = [{"model": tiny_sd1}, {"model": tiny_sd1_other}]
    merges = [{"method": "weighted_sum"}, {"method": "slerp"}, {"method": "weighted_sum"}] * 2
    alone = {m["method"]: pixels(run(cache, experts, m)) for m in merges[:2]}
    assert not np.array_equal(alone["weighted_sum"], alone["slerp"])
    results, errors = {}, []

    def worker(k, merge):
        try:
            results[k] = (merge["method"], pixels(run(cache, experts, merge)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, m)) for k, m in enumerate(merges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for method, image in results.values():
        assert np.array_equal(image, alone[method])


def test_block_weights_zero_keep_the_first_expert(tiny_sd1, tiny_sd1_other, cache):
    n_blocks = 10  # the tiny U-Net, 2 down blocks of 1 layer: BASE, IN00–IN03, M00, OUT00–OUT03
    first = run(cache, [{"model": tiny_sd1}], method="single")
    merged = run(
        cache,
        [{"model": tiny_sd1}, {"model": tiny_sd1_other}],
        {"method": "weighted_sum", "block_weights": [0.0] * n_blocks},
    )
    assert np.abs(pixels(first) - pixels(merged)).max() <= 1
    with pytest.raises(RecipeError, match="block_weights has 3 values; this U-Net has 10 blocks"):
        run(
            cache,
            [{"model": tiny_sd1}, {"model": tiny_sd1_other}],
            {"method": "weighted_sum", "block_weights": [1.0, 1.0, 1.0]},
        )


def test_bad_merges_are_refused_with_their_reason(tiny_sd1, tiny_sdxl, cache):
    with pytest.raises(RecipeError, match=r"merge\.base: null is not accepted for method 'ties'"):
        run(cache, [{"model": tiny_sd1}, {"model": tiny_sd1}], {"method": "ties"})
    with pytest.raises(RecipeError, match="cannot be merged") as info:
        run(cache, [{"model": tiny_sd1}, {"model": tiny_sdxl}], {"method": "weighted_sum"})
    assert tiny_sd1 in str(info.value) and tiny_sdxl in str(info.value)


def test_exported_merge_loads_back_and_gives_the_live_merge_pixels(
    tiny_sd1, tiny_sd1_other, cache, tmp_path
):
    from safetensors import safe_open

    from composer.__main__ import main

    experts = [{"model": tiny_sd1, "weight": 0.6}, {"model": tiny_sd1_other, "weight": 0.4}]
    merge = {"method": "dare_ties", "base": tiny_sd1_other, "density": 0.5, "seed": 3}
    recipe_path = tmp_path / "merge.json"
    recipe_path.write_text(
        json.dumps({"prompt": "a shape", "method": "merge", "experts": experts, "merge": merge})
    )
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(recipe_path), "--out", str(out), "--dtype", "fp32"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["composer_recipe"])["merge"]["method"] == "dare_ties"
    assert set(json.loads(meta["composer_inputs"])) == {tiny_sd1, tiny_sd1_other}
    live = run(cache, experts, merge)
    loaded = run(cache, [{"model": str(out)}], method="single")
    assert np.abs(pixels(live) - pixels(loaded)).max() <= 1
    assert not list(tmp_path.glob(".*partial"))


def test_export_refuses_bad_requests_before_writing(tiny_sd1, tiny_sdxl, tmp_path, capsys):
    from composer.__main__ import main

    recipe_path = tmp_path / "merge.json"
    recipe_path.write_text(
        json.dumps(
            {
                "prompt": "a",
                "method": "merge",
                "experts": [{"model": tiny_sd1}, {"model": tiny_sdxl}],
            }
        )
    )
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(recipe_path), "--out", str(out)]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
