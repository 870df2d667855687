"""The GPU speed switches (composer/speedups.py): read from the environment with clear errors,
applied when a model loads, and, where they run on a CPU, without changing the images beyond
float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from composer import engine, registry
from composer.recipe import RecipeError, parse
from composer.speedups import Speedups


def test_switches_are_off_unless_set_and_bad_values_name_what_is_accepted():
    assert Speedups.from_env({}) == Speedups()
    on = Speedups.from_env(
        {
            "COMPOSER_COMPILE": "reduce-overhead",
            "COMPOSER_CHANNELS_LAST": "1",
            "COMPOSER_SDPA": "flash",
            "COMPOSER_STREAMS": "yes",
        }
    )
    assert on == Speedups("reduce-overhead", True, "flash", True)
    with pytest.raises(ValueError, match=r"COMPOSER_COMPILE='fast' .* default, reduce-overhead"):
        Speedups.from_env({"COMPOSER_COMPILE": "fast"})
    with pytest.raises(ValueError, match=r"COMPOSER_STREAMS='maybe' is not accepted; use 1 or 0"):
        Speedups.from_env({"COMPOSER_STREAMS": "maybe"})


def superpose(model: str, other: str) -> dict:
    return {
        "prompt": "a",
        "method": "superpose",
        "experts": [{"model": model}, {"model": other, "prompt": "b"}],
        "sampler": {"steps": 3, "seed": 2, "num_images": 2},
    }


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_channels_last_math_attention_and_streams_change_nothing_but_rounding(
    tiny_sd1, tiny_sd1_other, monkeypatch
):
    recipe = parse(superpose(tiny_sd1, tiny_sd1_other))
    plain = engine.generate(recipe, cache=registry.ModelCache())
    for name, value in [
        ("COMPOSER_CHANNELS_LAST", "1"),
        ("COMPOSER_SDPA", "math"),
        ("COMPOSER_STREAMS", "1"),
    ]:
        monkeypatch.setenv(name, value)
    cache = registry.ModelCache()
    fast = engine.generate(recipe, cache=cache)
    with cache.lease(registry.resolve_model(tiny_sd1)) as lease:
        conv = lease.pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert not conv.is_contiguous()
    assert np.abs(pixels(fast) - pixels(plain)).max() <= 1


def test_compile_wraps_each_loaded_unet_in_place(tiny_sd1, monkeypatch):
    monkeypatch.setenv("COMPOSER_COMPILE", "default")
    pipe = registry.load_pipeline(
        registry.resolve_model(tiny_sd1), torch.device("cpu"), torch.float32
    )
    assert pipe.unet._compiled_call_impl is not None
    assert "conv_in.weight" in pipe.unet.state_dict()  # merges and LoRAs find the same keys


def test_a_bad_switch_is_a_clear_error_when_a_model_loads(tiny_sd1, monkeypatch):
    monkeypatch.setenv("COMPOSER_SDPA", "fastest")
    recipe = parse({"prompt": "a", "experts": [{"model": tiny_sd1}], "sampler": {"steps": 1}})
    with pytest.raises(RecipeError, match=r"COMPOSER_SDPA='fastest' is not accepted; use one of"):
        engine.generate(recipe, cache=registry.ModelCache())
