import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from composer import engine, registry
from composer.checkpoints.ldm_format import pipeline_to_ldm, save_single_file, unet_to_ldm
from composer.recipe import RecipeError, parse
from toyworld.tokenizer import save_tokenizer
from toyworld.zoo import make_unet


def build_wide_sdxl(folder, seed: int = 0) -> str:
    """A tiny random SDXL pipeline (diffusers folder) whose two text encoders differ in width
    (32 and 48), as SDXL's do (768 and 1280): ``from_single_file`` tells the encoders apart by
    width, so with equal widths it would read the first encoder's weights into the second."""
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(folder / "tokenizer_build")

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=width,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=32 + 48,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(48)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    out = folder / f"wide-sdxl-{seed}"
    pipe.save_pretrained(out, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="module")
def wide_sdxl(tmp_path_factory) -> str:
    return build_wide_sdxl(tmp_path_factory.mktemp("wide-sdxl"))


def test_diffusers_reads_back_every_tensor_we_write(tiny_sd1, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    save_file(pipeline_to_ldm(pipe), tmp_path / "one.safetensors")
    back = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "one.safetensors"), config=tiny_sd1, local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_diffusers_reads_back_every_sdxl_tensor_we_write(wide_sdxl, tmp_path):
    """SDXL: U-Net and VAE as SD 1.x; CLIP under ``conditioner.embedders.0.transformer.``; the
    OpenCLIP encoder under ``conditioner.embedders.1.model.`` with q/k/v fused into in_proj and
    the projection transposed. diffusers' reader must give back every tensor bit for bit."""
    pipe = StableDiffusionXLPipeline.from_pretrained(wide_sdxl)
    state = pipeline_to_ldm(pipe)
    prefix = "conditioner.embedders.1.model."
    q = pipe.text_encoder_2.state_dict()["text_model.encoder.layers.1.self_attn.q_proj.weight"]
    fused = state[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3 * 48, 48) and torch.equal(fused[:48], q)
    projection = pipe.text_encoder_2.state_dict()["text_projection.weight"]
    assert torch.equal(state[prefix + "text_projection"], projection.T)
    save_file(state, tmp_path / "xl.safetensors")
    back = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "xl.safetensors"), config=wide_sdxl, local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_unet_layout_follows_the_config_for_three_levels():
    """The toy zoo's U-Net (3 levels, attention in the first two) maps as the SD formula says."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = make_unet()
    state = unet.state_dict()
    ldm = unet_to_ldm(state, dict(unet.config))
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in ldm
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in ldm  # no attention: .1
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in ldm  # attention: .2
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_single_file_loads_through_the_registry_with_the_same_pixels(tiny_sd1, tmp_path):
    path = tmp_path / "exported.safetensors"
    save_single_file(StableDiffusionPipeline.from_pretrained(tiny_sd1), path, config=tiny_sd1)
    cache = registry.ModelCache()
    images = []
    for model in (tiny_sd1, str(path)):
        recipe = parse(
            {"prompt": "a red circle", "experts": [{"model": model}], "sampler": {"steps": 3}},
            check=registry.check_reference,
        )
        images.append(np.asarray(engine.generate(recipe, cache=cache).images[0]))
    assert registry.resolve_model(str(path)).kind == "single_file"
    assert np.array_equal(images[0], images[1])


def test_single_file_without_configs_offline_says_what_to_do(tiny_sd1, tmp_path, monkeypatch):
    path = tmp_path / "bare.safetensors"
    save_file(pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(tiny_sd1)), path)
    monkeypatch.delenv("COMPOSER_SINGLE_FILE_CONFIG", raising=False)
    with pytest.raises(RecipeError, match="COMPOSER_SINGLE_FILE_CONFIG"):
        registry.load_pipeline(
            registry.resolve_model(str(path)), torch.device("cpu"), torch.float32
        )
    monkeypatch.setenv("COMPOSER_SINGLE_FILE_CONFIG", tiny_sd1)
    pipe = registry.load_pipeline(
        registry.resolve_model(str(path)), torch.device("cpu"), torch.float32
    )
    assert registry.architecture(pipe) == "sd1"


def test_open_clip_layout_fuses_qkv_and_drops_position_ids():
    from composer.checkpoints.ldm_format import text_layout

    layer = "text_model.encoder.layers.0."
    names = [
        "text_model.embeddings.position_ids",
        *(f"{layer}self_attn.{p}_proj.{leaf}" for p in "kqv" for leaf in ("weight", "bias")),
        f"{layer}mlp.fc1.weight",
        "text_projection.weight",
    ]
    entries = {e.name: e for e in text_layout(names, "m.", open_clip=True)}
    assert set(entries) == {
        "m.transformer.resblocks.0.attn.in_proj_weight",
        "m.transformer.resblocks.0.attn.in_proj_bias",
        "m.transformer.resblocks.0.mlp.c_fc.weight",
        "m.text_projection",
    }
    fused = entries["m.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.op == "qkv"
    assert fused.sources == tuple(f"{layer}self_attn.{p}_proj.weight" for p in "qkv")
    assert entries["m.text_projection"].op == "t"
