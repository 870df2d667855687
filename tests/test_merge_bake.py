"""Baking LoRAs into weights (issue 5): ``composer lora bake`` and LoRAs on the experts of a
merge, live and exported, against W + s·(α/r)·B·A computed here by hand and against diffusers'
own LoRA loading."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from composer import engine, registry
from composer.__main__ import main
from composer.checkpoints.hashing import file_sha256
from composer.export import export
from composer.merge.live import merged_model
from composer.merge.registry import Merge
from composer.recipe import RecipeError, parse

TO_Q_RANK_2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K_ALPHA_2 = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def hand_lora(tiny_sd1, tmp_path_factory):
    """A PEFT LoRA on tiny_sd1's U-Net (attention q/k and the 3×3 resnet convs) and text encoder
    with r = 4, α = 8, one module at rank 2 and one at α = 2, as diffusers' training scripts save
    them (config in the file's metadata). Returns the file, its layers and each module's α/r."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "conv1"],
        rank_pattern={TO_Q_RANK_2: 2},
        alpha_pattern={TO_K_ALPHA_2: 2},
    )
    text_config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
    )
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    unet_layers = get_peft_model_state_dict(pipe.unet)
    text_layers = get_peft_model_state_dict(pipe.text_encoder)
    out = tmp_path_factory.mktemp("hand-lora")
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        safe_serialization=True,
    )
    scales = dict.fromkeys(_modules(unet_layers), 8 / 4) | {TO_Q_RANK_2: 8 / 2, TO_K_ALPHA_2: 2 / 4}
    return (
        str(out / "pytorch_lora_weights.safetensors"),
        {"unet": unet_layers, "text_encoder": text_layers},
        {"unet": scales, "text_encoder": dict.fromkeys(_modules(text_layers), 8 / 4)},
    )


def _modules(layers: dict) -> set[str]:
    return {k.split(".lora_A.")[0] for k in layers if ".lora_A." in k}


def hand_baked(weights: dict, layers: dict, scales: dict, strength: float) -> dict:
    """W + s·(α/r)·B·A per weight, B·A as a matrix product over the flattened kernel."""
    out = dict(weights)
    for module, scale in scales.items():
        down, up = layers[module + ".lora_A.weight"], layers[module + ".lora_B.weight"]
        w = weights[module + ".weight"]
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        out[module + ".weight"] = w + strength * scale * delta
    return out


def load(path) -> StableDiffusionPipeline:
    return registry.load_pipeline(
        registry.resolve_model(str(path)), torch.device("cpu"), torch.float32
    )


def generate(cache, experts, method="single", merge=None, **sampler):
    recipe = parse(
        {
            "prompt": "a red circle",
            "method": method,
            "experts": experts,
            **({"merge": merge} if merge else {}),
            "sampler": {"steps": 8, "seed": 3, "num_images": 2, **sampler},
        },
        check=registry.check_reference,
    )
    return np.stack([np.asarray(im) for im in engine.generate(recipe, cache=cache).images]).astype(
        int
    )


@pytest.fixture(scope="module")
def cache():
    return registry.ModelCache()


def test_bake_writes_w_plus_strength_alpha_over_r_b_a_into_each_weight(
    tiny_sd1, hand_lora, tmp_path
):
    path, layers, scales = hand_lora
    out = tmp_path / "baked.safetensors"
    assert (
        main(["lora", "bake", tiny_sd1, f"{path}:0.7", "--dtype", "fp32", "--out", str(out)]) == 0
    )
    original, back = StableDiffusionPipeline.from_pretrained(tiny_sd1), load(out)
    assert len(scales["unet"]) > 10 and len(scales["text_encoder"]) == 4
    for component in ("unet", "text_encoder"):
        before = getattr(original, component).state_dict()
        expected = hand_baked(before, layers[component], scales[component], 0.7)
        after = getattr(back, component).state_dict()
        assert after.keys() == before.keys()
        for key, value in expected.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=2e-6, msg=key)
        moved = [k for k in before if not torch.equal(after[k], before[k])]
        assert len(moved) == len(scales[component]), component
    ours, theirs = original.vae.state_dict(), back.vae.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["composer_recipe"])["experts"][0]["loras"] == [
        {"path": path, "weight": 0.7}
    ]
    assert file_sha256(path) == json.loads(meta["composer_inputs"])[path]


def test_baked_alpha_rank_and_text_encoder_layers_draw_what_diffusers_draws(
    tiny_sd1, hand_lora, cache, tmp_path
):
    """The same file loaded by diffusers (``load_lora_weights`` + ``set_adapters`` at 0.7, which
    reads α and the patterns from the file's metadata) and baked: the same pixels."""
    path, _, _ = hand_lora
    out = tmp_path / "baked.safetensors"
    assert (
        main(["lora", "bake", tiny_sd1, f"{path}:0.7", "--dtype", "fp32", "--out", str(out)]) == 0
    )
    loaded = generate(cache, [{"model": tiny_sd1, "loras": [{"path": path, "weight": 0.7}]}])
    baked = generate(cache, [{"model": str(out)}])
    plain = generate(cache, [{"model": tiny_sd1}])
    assert np.abs(loaded - baked).max() <= 2
    assert np.abs(loaded - plain).mean() > 5


def test_toy_purple_baked_into_toy_base_draws_what_the_loaded_lora_draws(cache, tmp_path):
    out = tmp_path / "toy-base-purple.safetensors"
    assert (
        main(["lora", "bake", "toy-base", "toy-purple:0.8", "--dtype", "fp32", "--out", str(out)])
        == 0
    )
    loaded = generate(
        cache, [{"model": "toy-base", "loras": [{"path": "toy-purple", "weight": 0.8}]}]
    )
    baked = generate(cache, [{"model": str(out)}])
    plain = generate(cache, [{"model": "toy-base"}])
    assert np.abs(loaded - baked).max() <= 2
    assert np.abs(loaded - plain).mean() > 5


def test_a_merge_bakes_each_experts_loras_before_merging():
    """Weighted sum 0.6 : 0.4 of toy-warm with toy-purple at 0.8 and toy-cool: every merged
    weight is 0.6·(W_warm + 0.8·B·A) + 0.4·W_cool, with B and A read from the file here."""
    models = registry.bundled("models")
    warm = UNet2DConditionModel.from_pretrained(models["toy-warm"], subfolder="unet")
    cool = UNet2DConditionModel.from_pretrained(models["toy-cool"], subfolder="unet")
    purple = registry.resolve_lora("toy-purple")
    raw = load_file(purple)
    layers = {k.removeprefix("unet."): v for k, v in raw.items()}
    ww, wc = warm.state_dict(), cool.state_dict()
    scales = dict.fromkeys(_modules(layers), 1.0)  # no alphas in the file: α = r
    warm_purple = hand_baked(ww, layers, scales, 0.8)
    experts = [("toy-warm", {"unet": warm}, 0.6), ("toy-cool", {"unet": cool}, 0.4)]
    loras = [[("experts[0].loras[0].path", purple, 0.8)], []]
    with merged_model(Merge("weighted_sum"), experts, None, loras) as merged:
        out = merged.modules["unet"].state_dict()
        for key in ww:
            torch.testing.assert_close(
                out[key], 0.6 * warm_purple[key] + 0.4 * wc[key], rtol=0, atol=1e-6, msg=key
            )
    assert sum(not torch.equal(warm_purple[k], ww[k]) for k in ww) == len(scales)


def test_a_merge_with_a_lora_gives_the_same_pixels_live_and_exported(cache, tmp_path):
    experts = [
        {"model": "toy-warm", "loras": [{"path": "toy-purple", "weight": 0.8}]},
        {"model": "toy-cool"},
    ]
    merge = {"method": "ties", "base": "toy-base", "density": 0.5}
    out = tmp_path / "merged.safetensors"
    recipe = parse(
        {"prompt": "a red circle", "method": "merge", "experts": experts, "merge": merge},
        check=registry.check_reference,
    )
    export(recipe, out, dtype="fp32")
    live = generate(cache, experts, "merge", merge)
    exported = generate(cache, [{"model": str(out)}])
    without = generate(cache, [{"model": "toy-warm"}, {"model": "toy-cool"}], "merge", merge)
    assert np.abs(live - exported).max() <= 1
    assert np.abs(live - without).mean() > 1


def test_text_encoders_merge_like_the_unet_with_every_experts_lora(
    tiny_sd1, tiny_sd1_other, hand_lora, tmp_path
):
    """As AUTOMATIC1111's merger and supermerger do, the text encoders are merged too: weighted
    sum 1 : 3 of tiny_sd1's encoder and tiny_sd1_other's with expert 2's LoRA text-encoder layers
    baked in (W + s·(α/r)·B·A by hand), the same live and in the exported file."""
    path, layers, scales = hand_lora
    experts = [
        {"model": tiny_sd1, "weight": 1.0},
        {"model": tiny_sd1_other, "weight": 3.0, "loras": [{"path": path, "weight": 0.5}]},
    ]
    recipe = parse(
        {"prompt": "a", "method": "merge", "experts": experts}, check=registry.check_reference
    )
    out = tmp_path / "merged.safetensors"
    export(recipe, out, dtype="fp32")
    pipes = [StableDiffusionPipeline.from_pretrained(m) for m in (tiny_sd1, tiny_sd1_other)]
    first, second = (p.text_encoder.state_dict() for p in pipes)
    baked = hand_baked(second, layers["text_encoder"], scales["text_encoder"], 0.5)
    expected = {k: 0.25 * first[k] + 0.75 * baked[k] for k in first}
    assert sum(not torch.equal(baked[k], second[k]) for k in second) == len(scales["text_encoder"])

    components = [{"unet": p.unet, "text_encoder": p.text_encoder} for p in pipes]
    lora_files = [[], [("experts[1].loras[0].path", path, 0.5)]]
    with merged_model(
        Merge("weighted_sum"), [("a", components[0], 1.0), ("b", components[1], 3.0)], None,
        lora_files,
    ) as live:  # fmt: skip
        live_state = live.modules["text_encoder"].state_dict()
        exported = load(out).text_encoder.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(live_state[key], value, rtol=0, atol=1e-6, msg=key)
            torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-6, msg=key)


def test_block_weight_base_holds_the_text_encoders(tiny_sd1, tiny_sd1_other):
    """supermerger's BASE weight covers the text encoder: at 0 it stays the first expert's (the
    reference of a weighted sum) while the U-Net blocks at 1 are merged; a regex override on
    ``text_encoder.`` names does the same for one layer."""
    from composer.merge.blocks import names_for_config

    pipes = [StableDiffusionPipeline.from_pretrained(m) for m in (tiny_sd1, tiny_sd1_other)]
    parts = [{"unet": p.unet, "text_encoder": p.text_encoder} for p in pipes]
    blocks = [0.0 if n == "BASE" else 1.0 for n in names_for_config(pipes[0].unet.config)]
    layer = r"^text_encoder\.text_model\.encoder\.layers\.0\."
    first, second = (p.text_encoder.state_dict() for p in pipes)
    for settings, kept in (
        (Merge("weighted_sum", block_weights=blocks), lambda k: True),
        (
            Merge("weighted_sum", overrides=((layer, 0.0),)),
            lambda k: k.startswith("encoder.layers.0."),
        ),
    ):
        with merged_model(settings, [("a", parts[0], 1.0), ("b", parts[1], 1.0)], None) as m:
            text, unet = m.modules["text_encoder"].state_dict(), m.modules["unet"].state_dict()
            for k in first:
                expected = first[k] if kept(k) else 0.5 * (first[k] + second[k])
                torch.testing.assert_close(text[k], expected, rtol=0, atol=1e-6, msg=k)
            k = "down_blocks.0.resnets.0.conv1.weight"
            mean = 0.5 * (pipes[0].unet.state_dict()[k] + pipes[1].unet.state_dict()[k])
            torch.testing.assert_close(unet[k], mean, rtol=0, atol=1e-6)


def test_text_encoders_that_differ_in_shape_are_refused_naming_both(tiny_sd1, tmp_path, cache):
    """Same U-Net, a text encoder with a wider MLP: refused before any work, live and export."""
    import shutil

    from transformers import CLIPTextModel

    other = tmp_path / "wide-mlp"
    shutil.copytree(tiny_sd1, other)
    encoder = CLIPTextModel.from_pretrained(tiny_sd1, subfolder="text_encoder")
    config = encoder.config
    config.intermediate_size += 8
    CLIPTextModel(config).save_pretrained(other / "text_encoder")
    experts = [{"model": tiny_sd1}, {"model": str(other)}]
    recipe = parse(
        {"prompt": "a", "method": "merge", "experts": experts}, check=registry.check_reference
    )
    message = r"cannot be merged: in their text encoders, .*mlp\.fc1\.\w+ is \(\d+.*\) in one"
    out = tmp_path / "x.safetensors"
    with pytest.raises(RecipeError, match=message) as refused:
        export(recipe, out)
    assert tiny_sd1 in str(refused.value) and str(other) in str(refused.value)
    assert not out.exists()
    with pytest.raises(RecipeError, match=message):
        generate(cache, experts, "merge")


def test_a_lora_that_does_not_fit_is_refused_before_any_work(tiny_lora, cache, tmp_path):
    experts = [{"model": "toy-base"}, {"model": "toy-cool", "loras": [{"path": tiny_lora}]}]
    recipe = parse(
        {"prompt": "a", "method": "merge", "experts": experts}, check=registry.check_reference
    )
    out = tmp_path / "x.safetensors"
    with pytest.raises(
        RecipeError, match=r"experts\[1\]\.loras\[0\]\.path: .* does not fit 'toy-cool'"
    ):
        export(recipe, out)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(RecipeError, match="does not fit 'toy-cool'"):
        generate(cache, experts, "merge")
