"""kohya and LyCORIS LoRA files (issue 19): built with ``lycoris-lora`` itself on tiny SD 1.x and
SDXL models, and applied by every path (generation adapters, baking for merges and exports,
``composer lora bake|merge``) exactly as lycoris' own modules compute in their forward pass."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from composer import engine, registry
from composer.__main__ import main
from composer.checkpoints.lora_files import read_lora
from composer.checkpoints.names import lora_name
from composer.export import export
from composer.merge import lora
from composer.recipe import RecipeError, parse

lycoris_kohya = pytest.importorskip("lycoris.kohya")

PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
FORMATS = {
    "lora": {"network_module": "locon", "conv_lora_dim": 0},
    "locon-tucker": {"network_module": "locon", "conv_lora_dim": 2, "use_tucker": True},
    "loha": {"network_module": "loha", "conv_lora_dim": 2},
    "loha-tucker": {"network_module": "loha", "conv_lora_dim": 2, "use_tucker": True},
    "lokr": {"network_module": "lokr", "conv_lora_dim": 2, "factor": 4},
    "lokr-tucker": {"network_module": "lokr", "conv_lora_dim": 2, "factor": 4, "use_tucker": True},
    "lokr-both": {"network_module": "lokr", "factor": 8, "decompose_both": True, "lora_dim": 2},
    "dora": {"network_module": "locon", "conv_lora_dim": 2, "weight_decompose": True},
    "loha-dora": {"network_module": "loha", "weight_decompose": True},
}


def network(pipe, seed: int, **options):
    """A lycoris network over ``pipe``'s U-Net and text encoder(s), kohya's names, with random
    (non-zero) layers; ``apply_to`` has wrapped the modules (``restore`` each layer to undo)."""
    lycoris_kohya.LycorisNetworkKohya.apply_preset(PRESET)
    encoders = [pipe.text_encoder] + (
        [pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else []
    )
    options = {"lora_dim": 4, "alpha": 2, "conv_alpha": 1, **options}
    net = lycoris_kohya.LycorisNetworkKohya(
        encoders if len(encoders) > 1 else encoders[0], pipe.unet, multiplier=1.0, **options
    )
    net.apply_to(encoders, pipe.unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            scale = 1.0 if "dora_scale" in name else 0.2
            noise = torch.randn(param.shape, generator=generator) * scale
            param.copy_(param.abs() + noise.abs() if "dora_scale" in name else noise)
    return net


def save_network(net, path, dtype=torch.float32) -> str:
    state = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    return str(path)


def unet_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    cond = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    extra = {}
    if c.addition_embed_type == "text_time":
        width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, width, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), cond, **extra).sample


def text_call(encoder):
    ids = torch.tensor([[0, 5, 9, 12, 1, 1]])
    with torch.no_grad():
        return encoder(ids).last_hidden_state


@pytest.fixture(scope="module")
def made(tiny_sd1, tmp_path_factory):
    """Each format's file over tiny_sd1, with lycoris' own outputs (U-Net and text encoder), and
    the outputs without it under ``None``."""
    folder = tmp_path_factory.mktemp("lycoris")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    out = {None: (None, unet_call(pipe.unet), text_call(pipe.text_encoder))}
    for i, (fmt, options) in enumerate(FORMATS.items()):
        net = network(pipe, seed=i, **options)
        dtype = torch.float16 if fmt == "lokr" else torch.bfloat16 if fmt == "loha" else None
        path = save_network(net, folder / f"{fmt}.safetensors", dtype or torch.float32)
        if dtype is not None:  # the reference runs with the weights as the file holds them
            net.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
        out[fmt] = (path, unet_call(pipe.unet), text_call(pipe.text_encoder))
        for layer in net.loras:
            layer.restore()
    return out


@pytest.fixture(scope="module")
def sd1_cache():
    """One model cache for the tests that only apply files: each makes exactly its own active."""
    return registry.ModelCache()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_generation_adapters_compute_what_lycoris_forward_computes(fmt, made, sd1_cache, tiny_sd1):
    path, unet_ref, text_ref = made[fmt]
    _, base_unet, base_text = made[None]
    assert (unet_ref - base_unet).abs().max() > 1e-2  # the file changes the model
    assert (text_ref - base_text).abs().max() > 1e-2
    with sd1_cache.lease(registry.resolve_model(tiny_sd1)) as lease:
        lease.use_loras([(path, 1.0)])
        unet_ours, text_ours = unet_call(lease.pipe.unet), text_call(lease.pipe.text_encoder)
    torch.testing.assert_close(unet_ours, unet_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(text_ours, text_ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["lora", "loha-tucker", "lokr-tucker", "dora"])
def test_baked_weights_compute_what_lycoris_forward_computes(fmt, made, tiny_sd1):
    path, unet_ref, text_ref = made[fmt]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    state = {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder")}
    shapes = {lora_name(c, k): tuple(v.shape) for c, sd in state.items() for k, v in sd.items()}
    plan = lora.bake_plan([("loras[0]", path, 1.0)], shapes, "tiny", dict(pipe.unet.config))
    for c, sd in state.items():
        getattr(pipe, c).load_state_dict(
            {k: lora.baked(v, plan.get(lora_name(c, k), ())) for k, v in sd.items()}
        )
    torch.testing.assert_close(unet_call(pipe.unet), unet_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(text_call(pipe.text_encoder), text_ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["locon-tucker", "dora"])
def test_strength_acts_as_lycoris_multiplier(fmt, tiny_sd1, sd1_cache, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    net = network(pipe, seed=5, **FORMATS[fmt])
    path = save_network(net, tmp_path / "x.safetensors")
    net.set_multiplier(0.4)
    ref = unet_call(pipe.unet)
    with sd1_cache.lease(registry.resolve_model(tiny_sd1)) as lease:
        lease.use_loras([(path, 0.4)])
        torch.testing.assert_close(unet_call(lease.pipe.unet), ref, atol=1e-4, rtol=0)


def test_kohya_file_generates_the_pixels_of_the_model_carrying_lycoris_deltas(tmp_path):
    """The engine with a LoHa (Tucker convs) on the bundled toy-base at strength 1 against the
    same recipe run on toy-base's modules wrapped by lycoris: the same pixels (within 3/255),
    alone and as one expert of a superposition (the other expert: toy-warm, no LoRA)."""
    toy = registry.bundled("models")["toy-base"]
    pipe = StableDiffusionPipeline.from_pretrained(toy, safety_checker=None)
    net = network(pipe, seed=11, **FORMATS["loha-tucker"])
    path = save_network(net, tmp_path / "toy-loha.safetensors")
    sampler = {"steps": 6, "seed": 3}

    def run(experts, cache, method="single"):
        recipe = parse(
            {"prompt": "a red circle", "experts": experts, "sampler": sampler, "method": method},
            check=registry.check_reference,
        )
        images = engine.generate(recipe, cache=cache).images
        return np.stack([np.asarray(im) for im in images]).astype(int)

    lora = [{"model": "toy-base", "loras": [{"path": path}]}]
    superposed = [{**lora[0], "prompt": "a circle"}, {"model": "toy-warm", "prompt": "a shape"}]
    ours = run(lora, registry.ModelCache())
    ours_or = run(superposed, registry.ModelCache(), "superpose")
    wrapped = registry.ModelCache()
    with wrapped.lease(registry.resolve_model("toy-base")) as lease:
        lease.pipe.unet, lease.pipe.text_encoder = pipe.unet, pipe.text_encoder
    theirs = run([{"model": "toy-base"}], wrapped)
    plain = [{"model": "toy-base", "prompt": "a circle"}, superposed[1]]
    theirs_or = run(plain, wrapped, "superpose")
    for layer in net.loras:
        layer.restore()
    base = run([{"model": "toy-base"}], wrapped)
    base_or = run(plain, wrapped, "superpose")
    assert np.abs(ours - base).max() > 30 and np.abs(ours_or - base_or).max() > 30
    assert np.abs(ours - theirs).max() <= 3
    assert np.abs(ours_or - theirs_or).max() <= 3


def test_a_float8_kohya_file_applies_as_lycoris_applies_its_values(tiny_sd1, sd1_cache, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    net = network(pipe, seed=21, **FORMATS["lokr"])
    state = {
        k: v.detach().to(torch.float8_e4m3fn) if v.dim() else v.detach()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(tmp_path / "f8.safetensors"))
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    ref = unet_call(pipe.unet)
    with sd1_cache.lease(registry.resolve_model(tiny_sd1)) as lease:
        lease.use_loras([(str(tmp_path / "f8.safetensors"), 1.0)])
        torch.testing.assert_close(unet_call(lease.pipe.unet), ref, atol=1e-4, rtol=0)


def test_a_kohya_lora_in_a_merge_gives_the_same_pixels_live_and_exported(tmp_path):
    """A LoKr (Tucker convs) on one expert of a TIES merge: baked alike into the live merge and
    into the exported file (``lora.baked``, the reading the tests above hold to lycoris)."""
    pipe = StableDiffusionPipeline.from_pretrained(registry.bundled("models")["toy-warm"])
    path = save_network(network(pipe, seed=4, **FORMATS["lokr-tucker"]), tmp_path / "k.safetensors")
    experts = [
        {"model": "toy-warm", "loras": [{"path": path, "weight": 0.8}]},
        {"model": "toy-cool"},
    ]
    merge = {"method": "ties", "base": "toy-base", "density": 0.5}

    def run(experts, method="merge"):
        recipe = parse(
            {
                "prompt": "a red circle",
                "method": method,
                "experts": experts,
                **({"merge": merge} if method == "merge" else {}),
                "sampler": {"steps": 6, "seed": 3},
            },
            check=registry.check_reference,
        )
        return recipe, np.asarray(engine.generate(recipe, cache=cache).images[0]).astype(int)

    cache = registry.ModelCache()
    recipe, live = run(experts)
    export(recipe, tmp_path / "merged.safetensors", dtype="fp32")
    _, exported = run([{"model": str(tmp_path / "merged.safetensors")}], "single")
    _, without = run([{"model": "toy-warm"}, {"model": "toy-cool"}])
    assert np.abs(live - exported).max() <= 1
    assert np.abs(live - without).max() > 10


def test_issue_repro_kohya_file_reads_with_its_alpha(tmp_path):
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = str(tmp_path / "k.safetensors")
    save_file(
        {
            f"{k}.lora_down.weight": torch.ones(4, 32),
            f"{k}.lora_up.weight": torch.ones(32, 4),
            f"{k}.alpha": torch.tensor(2.0),
        },
        path,
    )
    pair = read_lora(path)[k]
    assert pair.scale == 0.5
    torch.testing.assert_close(pair.delta(), torch.full((32, 32), 2.0))


def test_lora_bake_cli_bakes_a_lokr_file_as_lycoris_applies_it(made, tiny_sd1, tmp_path):
    path, unet_ref, _ = made["lokr-tucker"]
    out = tmp_path / "baked.safetensors"
    assert main(["lora", "bake", tiny_sd1, f"{path}:1.0", "--out", str(out)]) == 0
    back = registry.load_pipeline(
        registry.resolve_model(str(out)), torch.device("cpu"), torch.float32
    )
    torch.testing.assert_close(unet_call(back.unet), unet_ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("first, second", [("locon-tucker", "peft"), ("loha", "lokr-tucker")])
def test_lora_merge_cli_sums_files_of_any_layout_exactly(
    first, second, made, tiny_lora, tiny_sd1, tmp_path
):
    """Two files concatenated (a kohya LoCon and a PEFT LoRA; a LoHa whose convs are stored
    flattened and a LoKr whose are not): the merged file's ΔW is the sum of both."""
    a, b = (tiny_lora if f == "peft" else made[f][0] for f in (first, second))
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", a, b, "--strength", "1", "0.5", "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    shapes = {
        lora_name(c, k): tuple(v.shape)
        for c in ("unet", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
    }
    merged = lora.bake_plan([("m", str(out), 1.0)], shapes, "tiny")
    parts = lora.bake_plan([("a", a, 1.0), ("b", b, 0.5)], shapes, "tiny")
    assert set(merged) == set(parts) and merged
    for name, layers in parts.items():
        expected = sum(p.delta(s).reshape(shapes[name]) for p, s in layers)
        torch.testing.assert_close(merged[name][0][0].delta().reshape(shapes[name]), expected)


@pytest.fixture(scope="module")
def xl_made(tiny_sdxl, tmp_path_factory):
    """An fp16 LoHa over tiny_sdxl's U-Net and both text encoders, with lycoris' outputs."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    net = network(pipe, seed=9, network_module="loha", conv_lora_dim=2)
    path = save_network(net, tmp_path_factory.mktemp("xl") / "xl.safetensors", torch.float16)
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
    refs = unet_call(pipe.unet), text_call(pipe.text_encoder), text_call(pipe.text_encoder_2)
    for layer in net.loras:
        layer.restore()
    return path, refs, pipe


def xl_outputs(tiny_sdxl, path):
    with registry.ModelCache().lease(registry.resolve_model(tiny_sdxl)) as lease:
        lease.use_loras([(path, 1.0)])
        p = lease.pipe
        return unet_call(p.unet), text_call(p.text_encoder), text_call(p.text_encoder_2)


def test_sdxl_kohya_file_with_both_text_encoders_applies_as_lycoris(xl_made, tiny_sdxl):
    path, refs, _ = xl_made
    keys = load_file(path).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(
        k.startswith("lora_te2_") for k in keys
    )
    for a, b in zip(xl_outputs(tiny_sdxl, path), refs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_kohya_sdxl_files_name_unet_modules_the_ldm_way(xl_made, tiny_sdxl, tmp_path):
    """sd-scripts trains SDXL on its own U-Net: ``lora_unet_input_blocks_4_1_…``, and its text
    encoders' names keep ``text_model_``; both spellings apply alike."""
    from composer.checkpoints.ldm_format import _map_key, unet_prefix_map

    path, refs, pipe = xl_made
    prefixes = unet_prefix_map(pipe.unet.config)
    ldm = {}
    for name, _ in pipe.unet.named_modules():
        try:
            ldm["lora_unet_" + name.replace(".", "_")] = "lora_unet_" + _map_key(
                name + ".weight", prefixes
            ).removesuffix(".weight").replace(".", "_")
        except KeyError:
            continue
    renamed = {}
    for key, value in load_file(path).items():
        module, _, suffix = key.partition(".")
        module = ldm.get(module, module)
        for te in ("lora_te1_", "lora_te2_"):
            if module.startswith(te) and not module.startswith(te + "text_"):
                module = te + "text_model_" + module[len(te) :]
        renamed[f"{module}.{suffix}"] = value
    assert any("input_blocks" in k for k in renamed) and any("_text_model_" in k for k in renamed)
    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    for a, b in zip(xl_outputs(tiny_sdxl, str(tmp_path / "ldm.safetensors")), refs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_lora_for_another_architecture_is_refused_naming_a_key(
    made, tiny_sd1, tiny_sdxl, tmp_path
):
    path, _, _ = made["loha"]
    renamed = tmp_path / "te2.safetensors"
    state = load_file(path)
    save_file({k.replace("lora_te_", "lora_te2_"): v for k, v in state.items()}, str(renamed))
    cache = registry.ModelCache()
    with cache.lease(registry.resolve_model(tiny_sdxl)) as lease:
        with pytest.raises(RecipeError, match=r"ΔW for lora_unet_\w+ is \(16, 32\), the weight"):
            lease.use_loras([(path, 1.0)])
        assert not lease.entry.adapters and not getattr(lease.pipe.unet, "peft_config", None)
    with cache.lease(registry.resolve_model(tiny_sd1)) as lease:
        with pytest.raises(RecipeError, match=r"match no module of this model \(e\.g\. lora_te2_"):
            lease.use_loras([(str(renamed), 1.0)])
        assert not lease.entry.adapters


def test_a_lora_holding_nan_is_refused_and_nothing_stays_loaded(made, tiny_sd1, tmp_path):
    path, _, _ = made["lora"]
    state = load_file(path)
    key = sorted(k for k in state if k.endswith("lora_up.weight"))[3]
    state[key][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    with registry.ModelCache().lease(registry.resolve_model(tiny_sd1)) as lease:
        with pytest.raises(RecipeError, match=f"{key} holds a non-finite value"):
            lease.use_loras([(str(bad), 1.0)])
        assert not lease.entry.adapters
    assert main(["lora", "merge", str(bad), path, "--out", str(tmp_path / "o.safetensors")]) == 2
    assert not (tmp_path / "o.safetensors").exists()
    save_file({k: v.to(torch.int8) for k, v in state.items()}, str(tmp_path / "int8.safetensors"))
    with pytest.raises(ValueError, match=r"is torch.int8; LoRA weights are floats"):
        read_lora(str(tmp_path / "int8.safetensors"))


def test_a_peft_dora_file_bakes_what_peft_computes(tiny_sd1, tmp_path):
    """diffusers' own layout with DoRA magnitudes: baked weights give PEFT's forward."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    torch.manual_seed(2)
    config = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=["to_q", "to_v"]
    )
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.5)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    reference = unet_call(pipe.unet)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    shapes = {lora_name("unet", k): tuple(v.shape) for k, v in base.items()}
    plan = lora.bake_plan([("l", path, 1.0)], shapes, "tiny")
    assert any(pair.peft_dora for layers in plan.values() for pair, _ in layers)
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    plain.unet.load_state_dict(
        {k: lora.baked(v, plan.get(lora_name("unet", k), ())) for k, v in base.items()}
    )
    torch.testing.assert_close(unet_call(plain.unet), reference, atol=1e-4, rtol=0)
