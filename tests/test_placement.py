"""Superposition experts over the GPUs of one replica (``composer.serve.placement``): the
placement logic alone, on the CPU; it needs neither Ray nor a GPU."""

from __future__ import annotations

import math

import pytest

from composer import registry
from composer.recipe import parse
from composer.serve.placement import (
    HEADROOM,
    GiB,
    PlacementError,
    place,
    place_recipe,
    weights_bytes,
)


def test_models_that_fit_one_device_all_go_on_it():
    placed = place({"a": 3 * GiB, "b": 2 * GiB}, budget=10 * GiB, devices=1)
    assert placed.device == {"a": "cuda:0", "b": "cuda:0"}
    assert placed.used == (5 * GiB,)


def test_models_spread_over_the_devices_largest_first_each_on_the_emptiest():
    placed = place({"a": 6 * GiB, "b": 5 * GiB, "c": 4 * GiB}, budget=10 * GiB, devices=2)
    assert placed.device == {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1"}
    assert placed.used == (6 * GiB, 9 * GiB)
    assert max(placed.used) <= 10 * GiB


def test_too_little_room_is_refused_with_the_number_of_devices_it_needs():
    with pytest.raises(PlacementError) as refused:
        place({"a": 6 * GiB, "b": 6 * GiB, "c": 6 * GiB}, budget=10 * GiB, devices=2)
    message = str(refused.value)
    assert "need 18.00 GiB (a 6.00 GiB, b 6.00 GiB, c 6.00 GiB)" in message
    assert "do not fit 2 device(s) of 10.00 GiB; they need 3" in message
    assert "--gpus-per-replica 3" in message


def test_a_model_larger_than_one_device_is_refused_naming_it():
    with pytest.raises(PlacementError, match=r"big needs more than one device's 10\.00 GiB"):
        place({"big": 12 * GiB, "small": 1 * GiB}, budget=10 * GiB, devices=4)


def test_weights_bytes_reads_what_loading_the_pipeline_takes():
    source = registry.resolve_model("toy-warm")
    with registry.ModelCache().lease(source) as lease:
        loaded = registry.pipeline_bytes(lease.pipe)  # fp32 on the CPU
    assert weights_bytes(source.location, dtype_bytes=4) == loaded
    assert weights_bytes(source.location, dtype_bytes=2) == loaded // 2


def test_a_superposition_recipe_is_split_over_two_devices_or_refused_on_one():
    recipe = parse(
        {
            "prompt": "",
            "method": "superpose",
            "experts": [
                {"model": "toy-warm", "prompt": "a red circle"},
                {"model": "toy-cool", "prompt": "a blue square"},
                {"model": "toy-warm", "prompt": "a circle"},
            ],
        },
        check=registry.check_reference,
    )
    one = weights_bytes(registry.resolve_model("toy-warm").location) * HEADROOM
    budget = int(one * 1.5)
    placed = place_recipe(recipe, budget, devices=2)
    assert placed.device == {"toy-cool": "cuda:0", "toy-warm": "cuda:1"}
    with pytest.raises(PlacementError, match=r"toy-cool .* toy-warm .*they need 2"):
        place_recipe(recipe, budget, devices=1)


def test_a_superposition_is_placed_over_gpus_only_when_one_cannot_hold_it(monkeypatch):
    """``superpose.place`` (what the engine asks before it leases the models): nothing to place
    on one device or when one GPU holds every model; else each model on its GPU; and a refusal
    that names the devices needed when even all of them are too small."""
    import torch

    from composer.methods import superpose

    recipe = parse({"prompt": "", "method": "superpose", "experts": [
        {"model": "toy-warm", "prompt": "a red circle"},
        {"model": "toy-cool", "prompt": "a blue square"},
    ]})  # fmt: skip
    one_model = math.ceil(weights_bytes(registry.resolve_model("toy-warm").location) * HEADROOM)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert superpose.place(recipe) == {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("COMPOSER_GPU_BUDGET_GB", str(3 * one_model / GiB))
    assert superpose.place(recipe) == {}  # both fit one GPU
    monkeypatch.setenv("COMPOSER_GPU_BUDGET_GB", str(1.5 * one_model / GiB))
    assert sorted(superpose.place(recipe).values()) == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("COMPOSER_GPU_BUDGET_GB", str(0.5 * one_model / GiB))
    with pytest.raises(PlacementError, match="needs more than one device"):
        superpose.place(recipe)


def test_the_engine_leases_each_placed_model_on_its_device(monkeypatch):
    """What ``place`` answers is what the engine loads: a model placed on another device gets a
    cache entry of its own there; one placed on the default device shares the default entry."""
    from composer import engine
    from composer.methods import METHODS

    leased = []
    cache = registry.ModelCache()
    real = cache.lease

    def spy(source, device=None):
        leased.append((source.reference, device))
        return real(source, device)

    monkeypatch.setattr(cache, "lease", spy)
    from dataclasses import replace

    placing = replace(METHODS["superpose"], place=lambda recipe: {"toy-cool": "cpu"})
    monkeypatch.setitem(METHODS, "superpose", placing)
    recipe = parse({"prompt": "", "method": "superpose", "sampler": {"steps": 2}, "experts": [
        {"model": "toy-warm", "prompt": "a red circle"},
        {"model": "toy-cool", "prompt": "a blue square"},
    ]})  # fmt: skip
    assert len(engine.generate(recipe, cache=cache).images) == 1
    assert sorted(leased) == [("toy-cool", "cpu"), ("toy-warm", None)]
    assert len(cache._entries) == 2  # "cpu" is the default device here: no second copy
