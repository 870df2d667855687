import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from composer import engine, registry
from composer.ldm_format import pipeline_to_ldm, save_single_file, unet_to_ldm
from composer.recipe import RecipeError, parse
from toyworld.train import make_unet


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
