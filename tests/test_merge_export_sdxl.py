"""``composer.export`` on SDXL-shaped models: the SDXL single-file layout, both text
encoders merged (the second's fused OpenCLIP q/k/v taken apart for it), loading back through the
registry, LoRAs on the second encoder."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from test_ldm_format import build_wide_sdxl

from composer import engine, registry
from composer.export import export
from composer.recipe import parse


@pytest.fixture(scope="module")
def xl_pair(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("xl-pair")
    return build_wide_sdxl(folder, seed=0), build_wide_sdxl(folder, seed=1)


def recipe(experts, merge=None, method="merge", **sampler):
    return parse(
        {
            "prompt": "a red circle",
            "method": method,
            "experts": experts,
            **({"merge": merge} if merge else {}),
            "sampler": {"steps": 3, "seed": 2, **sampler},
        },
        check=registry.check_reference,
    )


def load(path) -> StableDiffusionXLPipeline:
    return registry.load_pipeline(
        registry.resolve_model(str(path)), torch.device("cpu"), torch.float32
    )


def test_sdxl_export_is_the_weighted_sum_of_unets_and_text_encoders(xl_pair, tmp_path):
    """0.3·A + 0.7·B per U-Net and text-encoder tensor, by hand; the VAE is A's, bit for bit;
    the file is an SDXL checkpoint that the registry loads back as one."""
    a, b = xl_pair
    out = tmp_path / "xl.safetensors"
    export(recipe([{"model": a, "weight": 0.3}, {"model": b, "weight": 0.7}]), out, dtype="fp32")
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        assert set(json.loads(f.metadata()["composer_inputs"])) == {a, b}
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    back = load(out)
    assert isinstance(back, StableDiffusionXLPipeline)
    assert registry.architecture(back) == "sdxl"
    pa, pb = (
        StableDiffusionXLPipeline.from_pretrained(a),
        StableDiffusionXLPipeline.from_pretrained(b),
    )
    ua, ub, merged = pa.unet.state_dict(), pb.unet.state_dict(), back.unet.state_dict()
    assert merged.keys() == ua.keys()
    for k in ua:
        torch.testing.assert_close(merged[k], 0.3 * ua[k] + 0.7 * ub[k], rtol=0, atol=1e-6)
    for name in ("text_encoder", "text_encoder_2"):
        ea, eb = getattr(pa, name).state_dict(), getattr(pb, name).state_dict()
        theirs = getattr(back, name).state_dict()
        assert ea.keys() == theirs.keys(), name
        for k in ea:
            expected = 0.3 * ea[k] + 0.7 * eb[k] if ea[k].is_floating_point() else ea[k]
            torch.testing.assert_close(theirs[k], expected, rtol=0, atol=1e-6, msg=k)
    ours, theirs = pa.vae.state_dict(), back.vae.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_text_encoders_merge_alike_live_and_exported_from_single_files(xl_pair, tmp_path):
    """DARE-TIES draws each mask from (seed, parameter name): the export gives the live merge's
    text encoders only if it takes a single file's fused OpenCLIP q/k/v apart and names each
    projection as the live merge does."""
    from composer.merge.live import merged_model
    from composer.merge.plan import COMPONENTS
    from composer.merge.registry import Merge

    a, b = xl_pair
    files = []
    for name, model in (("a", a), ("b", b)):
        files.append(str(tmp_path / f"{name}.safetensors"))
        export(recipe([{"model": model}], method="single"), files[-1], dtype="fp32")
    merge = {"method": "dare_ties", "base": b, "density": 0.5, "seed": 4}
    out = tmp_path / "dare.safetensors"
    export(recipe([{"model": files[0]}, {"model": files[1]}], merge), out, dtype="fp32")
    back = load(out)
    pipes = [load(p) for p in (*files, b)]
    parts = [{c: getattr(p, c) for c in COMPONENTS} for p in pipes]
    settings = Merge("dare_ties", base="b", density=0.5, seed=4)
    with merged_model(settings, [("a", parts[0], 1.0), ("b", parts[1], 1.0)], ("b", parts[2])) as m:
        for c in COMPONENTS:
            live, exported = m.modules[c].state_dict(), getattr(back, c).state_dict()
            original = parts[0][c].state_dict()
            assert any(not torch.equal(live[k], original[k]) for k in live), c
            for k in live:
                torch.testing.assert_close(exported[k], live[k], rtol=0, atol=1e-6, msg=k)


def test_sdxl_export_of_one_model_loads_back_with_identical_unet_and_pixels(xl_pair, tmp_path):
    a, _ = xl_pair
    out = tmp_path / "a.safetensors"
    export(recipe([{"model": a}], method="single"), out, dtype="fp32")
    original = StableDiffusionXLPipeline.from_pretrained(a).unet.state_dict()
    back = load(out).unet.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    cache = registry.ModelCache()
    images = [
        np.asarray(engine.generate(recipe([{"model": m}], method="single"), cache=cache).images[0])
        for m in (a, str(out))
    ]
    assert np.array_equal(images[0], images[1])


def test_sdxl_live_merge_and_its_export_give_the_same_pixels(xl_pair, tmp_path):
    a, b = xl_pair
    experts = [{"model": a, "weight": 0.6}, {"model": b, "weight": 0.4}]
    merge = {"method": "ties", "base": b, "density": 0.5}
    out = tmp_path / "ties.safetensors"
    export(recipe(experts, merge), out, dtype="fp32")
    cache = registry.ModelCache()
    live = engine.generate(recipe(experts, merge), cache=cache)
    loaded = engine.generate(recipe([{"model": str(out)}], method="single"), cache=cache)
    diff = np.abs(np.asarray(live.images[0]).astype(int) - np.asarray(loaded.images[0]))
    assert diff.max() <= 1


def test_lora_on_the_second_text_encoder_is_baked_through_the_fused_qkv(xl_pair, tmp_path):
    """A LoRA on the OpenCLIP encoder's q, k and v: the written in_proj is [W_q + ΔW_q; W_k +
    ΔW_k; W_v + ΔW_v], and diffusers reads back each W + s·(α/r)·B·A computed here by hand."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    a, _ = xl_pair
    pipe = StableDiffusionXLPipeline.from_pretrained(a)
    original = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    torch.manual_seed(3)
    config = LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj"]
    )
    pipe.text_encoder_2.add_adapter(config)
    layers = get_peft_model_state_dict(pipe.text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_2_lora_layers=layers,
        text_encoder_2_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    out = tmp_path / "baked.safetensors"
    export(
        recipe([{"model": a, "loras": [{"path": str(lora_file), "weight": 0.5}]}], method="single"),
        out,
        dtype="fp32",
    )
    back = load(out).text_encoder_2.state_dict()
    changed = 0
    for key, value in original.items():
        module = key.removesuffix(".weight")
        down = layers.get(f"{module}.lora_A.weight")
        expected = value
        if down is not None:
            delta = 0.5 * (6 / 2) * layers[f"{module}.lora_B.weight"] @ down
            assert delta.abs().max() > 1e-2
            expected = value + delta
            changed += 1
        torch.testing.assert_close(back[key], expected, rtol=0, atol=1e-6, msg=key)
    assert changed == 3 * 2  # q, k, v in each of the 2 layers
