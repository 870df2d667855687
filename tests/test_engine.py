import threading
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from composer import engine, registry
from composer.recipe import SCHEDULERS, RecipeError, parse


def run(model, loras=(), cache=None, **sampler):
    recipe = parse(
        {
            "prompt": "a red circle",
            "experts": [{"model": model, "loras": [{"path": p, "weight": w} for p, w in loras]}],
            "sampler": {"steps": 3, "num_images": 1, **sampler},
        },
        check=registry.check_reference,
    )
    return engine.generate(recipe, cache=cache)


def pixels(result, i=0):
    return np.asarray(result.images[i]).astype(np.int16)


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def test_same_recipe_gives_identical_pixels(tiny_sd1, cache):
    a = run(tiny_sd1, cache=cache, seed=7, num_images=2)
    b = run(tiny_sd1, cache=cache, seed=7, num_images=2)
    assert np.array_equal(pixels(a, 0), pixels(b, 0)) and np.array_equal(pixels(a, 1), pixels(b, 1))
    assert not np.array_equal(pixels(a, 0), pixels(a, 1))


def test_image_i_uses_seed_plus_i_and_its_png_recipe_remakes_it(tiny_sd1, cache):
    from composer.sharing.pnginfo import image_recipe

    batch = run(tiny_sd1, cache=cache, seed=5, num_images=3)
    assert batch.seeds == [5, 6, 7]
    alone = engine.generate(image_recipe(batch.recipe, 2), cache=cache)
    assert np.array_equal(pixels(batch, 2), pixels(alone, 0))


def test_native_size_is_used_when_size_is_omitted_and_size_is_honoured(tiny_sd1, cache):
    assert run(tiny_sd1, cache=cache).images[0].size == (16, 16)
    assert run(tiny_sd1, cache=cache, width=32, height=24).images[0].size == (32, 24)


def test_sdxl_generates(tiny_sdxl, cache):
    result = run(tiny_sdxl, cache=cache, num_images=2)
    assert len(result.images) == 2 and result.images[0].size == (16, 16)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_name_runs_and_differs_from_euler(tiny_sd1, cache, name):
    result = run(tiny_sd1, cache=cache, scheduler=name, steps=4)
    assert len(result.trace[0]) >= 1
    if name not in ("euler", "lms", "heun", "dpm2", "pndm", "dpmpp_2m", "unipc", "ddim"):
        assert not np.array_equal(pixels(result), pixels(run(tiny_sd1, cache=cache, steps=4)))


def test_lora_strength_zero_equals_no_lora(tiny_sd1, tiny_lora, cache):
    plain = run(tiny_sd1, cache=cache)
    zero = run(tiny_sd1, [(tiny_lora, 0.0)], cache=cache)
    full = run(tiny_sd1, [(tiny_lora, 1.0)], cache=cache)
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(plain) - pixels(full)).mean() > 1.0


def test_two_loras_load_without_peft_warning_of_multiple_adapters(tiny_sd1, tiny_lora, tmp_path):
    """Every request's LoRAs become adapters of the cached model, so peft's "Already found a
    `peft_config` attribute … multiple adapters" warning (printed on every adapter after the
    first) is noise to a CLI or page user; it is silenced where the registry loads them."""
    from tests.conftest import build_lora

    other = build_lora(tiny_sd1, tmp_path / "other", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(tiny_sd1, [(tiny_lora, 1.0), (other, 0.5)])
    assert len(result.images) == 1
    assert not [w for w in caught if "peft_config" in str(w.message)], caught


def test_lora_of_one_request_is_absent_from_the_next_on_the_same_cached_model(tiny_sd1, tiny_lora):
    cache = registry.ModelCache()
    before = run(tiny_sd1, cache=cache)
    with_lora = run(tiny_sd1, [(tiny_lora, 1.0)], cache=cache)
    after = run(tiny_sd1, cache=cache)
    assert cache.loads == 1
    assert np.array_equal(pixels(before), pixels(after))
    assert not np.array_equal(pixels(before), pixels(with_lora))


def test_concurrent_requests_with_and_without_lora_do_not_mix(tiny_sd1, tiny_lora):
    cache = registry.ModelCache()
    expected = {
        False: pixels(run(tiny_sd1, cache=cache)),
        True: pixels(run(tiny_sd1, [(tiny_lora, 1.0)], cache=cache)),
    }
    got, errors = [], []

    def worker(use_lora):
        try:
            r = run(tiny_sd1, [(tiny_lora, 1.0)] if use_lora else [], cache=cache)
            got.append((use_lora, pixels(r)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(p, expected[flag]) for flag, p in got) and len(got) == 6


def kohya_from_peft(path, out):
    """Rename diffusers/PEFT LoRA keys to kohya's (``lora_unet_…​.lora_down.weight`` + alpha)."""
    state = load_file(path)
    kohya = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        if kind.startswith("A"):
            kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    save_file(kohya, out)
    return str(out)


def test_kohya_lora_gives_the_same_image_as_its_peft_twin(tiny_sd1, tiny_lora, tmp_path, cache):
    kohya = kohya_from_peft(tiny_lora, tmp_path / "kohya.safetensors")
    a = run(tiny_sd1, [(tiny_lora, 0.7)], cache=cache)
    b = run(tiny_sd1, [(kohya, 0.7)], cache=cache)
    assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_progress_counts_every_step_of_every_image(tiny_sd1, cache):
    def seen(**sampler):
        steps = []
        recipe = parse({"prompt": "a", "experts": [{"model": tiny_sd1}],
                        "sampler": {"steps": 3, "num_images": 2, **sampler}})  # fmt: skip
        engine.generate(
            recipe, progress=lambda done, total: steps.append((done, total)), cache=cache
        )
        return steps

    assert seen(batch_size=1) == [(i, 6) for i in range(1, 7)]
    assert seen() == [(2, 6), (4, 6), (6, 6)]  # both images at every step of one batch


def test_cancel_stops_the_request(tiny_sd1, cache):
    cancel = threading.Event()
    recipe = parse({"prompt": "a", "experts": [{"model": tiny_sd1}],
                    "sampler": {"steps": 5, "num_images": 3, "batch_size": 1}})  # fmt: skip

    def progress(done, total):
        if done == 7:
            cancel.set()

    with pytest.raises(engine.Cancelled) as info:
        engine.generate(recipe, progress=progress, cancel=cancel, cache=cache)
    assert len(info.value.images) == 1


def test_cancel_inside_a_batch_stops_within_a_step(tiny_sd1, cache):
    cancel, seen = threading.Event(), []
    recipe = parse({"prompt": "a", "experts": [{"model": tiny_sd1}],
                    "sampler": {"steps": 5, "num_images": 3}})  # fmt: skip

    def progress(done, total):
        seen.append(done)
        if done == 6:  # step 2 of the batch of 3
            cancel.set()

    with pytest.raises(engine.Cancelled) as info:
        engine.generate(recipe, progress=progress, cancel=cancel, cache=cache)
    assert info.value.images == [] and seen == [3, 6]


def test_lora_for_another_architecture_is_a_recipe_error(tiny_sdxl, tiny_lora, cache):
    with pytest.raises(RecipeError, match="could not be applied"):
        run(tiny_sdxl, [(tiny_lora, 1.0)], cache=cache)


def test_loaded_adapters_are_capped_and_evicted_ones_reload(
    tiny_sd1, tiny_lora, tmp_path, monkeypatch
):
    import shutil

    monkeypatch.setattr(registry, "MAX_ADAPTERS", 2)
    copies = []
    for k in range(3):
        copies.append(str(tmp_path / f"copy{k}.safetensors"))
        shutil.copy(tiny_lora, copies[-1])
    cache = registry.ModelCache()
    first = pixels(run(tiny_sd1, [(copies[0], 1.0)], cache=cache))
    for path in copies[1:]:
        run(tiny_sd1, [(path, 1.0)], cache=cache)
    entry = cache._entries[registry.resolve_model(tiny_sd1).location]
    assert len(entry.adapters) == 2 and copies[0] not in entry.adapters
    assert np.array_equal(pixels(run(tiny_sd1, [(copies[0], 1.0)], cache=cache)), first)
