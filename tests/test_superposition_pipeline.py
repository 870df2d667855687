"""SuperpositionPipeline (pipelines/superposition/pipeline.py) on tiny random SD 1.x / SDXL models.

Images are 16×16 (8×8 latents), 3–4 steps; torch runs single-threaded (a busy 2-core machine).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from pipelines.superposition import SuperpositionPipeline, sample_superposition

STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1_pipes(tiny_sd1):
    """Two SD 1.x pipelines from the same folder, the second with a perturbed U-Net."""
    first, second = (
        _load(StableDiffusionPipeline, tiny_sd1),
        _load(StableDiffusionPipeline, tiny_sd1),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in second.unet.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return first, second


@pytest.fixture(scope="module")
def pipe(sd1_pipes):
    sp = SuperpositionPipeline.from_pipes(list(sd1_pipes))
    sp.set_progress_bar_config(disable=True)
    return sp


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["or", "and", "average", "joint"])
def test_modes_give_images_of_the_right_count_and_size(pipe, mode):
    out = pipe(
        ["a red shape", "a circle"],
        num_inference_steps=STEPS,
        generator=_gen(),
        num_images_per_prompt=2,
        mode=mode,
    )
    n = 1 if mode == "joint" else 2
    assert len(out.images) == 2
    assert all(image.size == (16, 16) for image in out.images)
    assert out.kappa.shape == (STEPS, n, 2)
    assert out.log_density.shape == (STEPS + 1, n, 2)
    assert torch.all(out.log_density[0] == 0)
    torch.testing.assert_close(out.kappa.sum(1), torch.ones(STEPS, 2, dtype=torch.float64))
    if mode == "average":
        assert torch.all(out.kappa == 0.5)
    if mode == "joint":
        assert torch.all(out.kappa == 1)


def test_or_weights_move_away_from_uniform(pipe):
    out = pipe("a circle", num_inference_steps=STEPS, generator=_gen(), mode="or")
    assert torch.all(out.kappa[0] == 0.5)
    assert not torch.allclose(out.kappa[-1], torch.full_like(out.kappa[-1], 0.5))


def test_same_seed_same_images_different_seed_different_images(pipe):
    def run(seed):
        return pipe("a circle", num_inference_steps=STEPS, generator=_gen(seed), output_type="np")

    a, b, c = run(0), run(0), run(1)
    assert (a.images == b.images).all()
    assert torch.equal(a.kappa, b.kappa)
    assert not (a.images == c.images).all()


def test_experts_on_one_unet_share_one_batched_call_per_step(pipe):
    batches = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True
    )
    try:
        out = pipe(
            experts=[(0, "a red shape"), (0, "a circle")],
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=_gen(),
            num_images_per_prompt=2,
            output_type="latent",
        )
    finally:
        handle.remove()
    assert batches == [(2 + 1) * 2] * STEPS
    assert out.kappa.shape == (STEPS, 2, 2)


def test_one_expert_or_equals_average(pipe):
    def run(mode):
        return pipe(
            experts=[(1, "a circle")],
            num_inference_steps=STEPS,
            generator=_gen(),
            mode=mode,
            output_type="latent",
        )

    a, b = run("or"), run("average")
    assert torch.equal(a.images, b.images)
    assert torch.all(a.kappa == 1) and torch.all(b.kappa == 1)


def test_pipeline_matches_the_core_sampler_on_one_expert(pipe, sd1_pipes):
    sd = sd1_pipes[0]
    steps = 4
    out = pipe(
        experts=[(0, "a circle")],
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=_gen(3),
        output_type="latent",
    )

    with torch.no_grad():
        embeds, _ = sd.encode_prompt("a circle", "cpu", 1, False)
        scheduler = EulerDiscreteScheduler.from_config(sd.scheduler.config)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas
        t_of = {float(s): t for s, t in zip(sigmas[:-1], scheduler.timesteps, strict=True)}

        def denoise(x, sigma):
            s = float(sigma)
            eps = sd.unet(x / math.sqrt(s * s + 1), t_of[s], encoder_hidden_states=embeds).sample
            return None, eps[None]

        gen = _gen(3)
        x = torch.randn((1, 4, 8, 8), generator=gen) * sigmas[0]
        x, trace = sample_superposition(denoise, x, sigmas, mode="or", generator=gen)
    torch.testing.assert_close(out.images, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_density, trace["log_density"])


def test_sdxl_runs_or_with_two_prompts(tiny_sdxl):
    sp = SuperpositionPipeline.from_pipes([_load(StableDiffusionXLPipeline, tiny_sdxl)])
    sp.set_progress_bar_config(disable=True)
    out = sp(
        experts=[(0, "a red shape"), (0, "a circle")],
        num_inference_steps=STEPS,
        generator=_gen(),
        mode="or",
        num_images_per_prompt=2,
    )
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    assert out.kappa.shape == (STEPS, 2, 2)


def test_mixing_sd1_and_sdxl_is_refused_naming_both(sd1_pipes, tiny_sd1, tiny_sdxl):
    sdxl = _load(StableDiffusionXLPipeline, tiny_sdxl)
    with pytest.raises(ValueError, match="SDXL latents cannot be superposed") as err:
        SuperpositionPipeline.from_pipes([sd1_pipes[0], sdxl])
    assert tiny_sd1 in str(err.value) and tiny_sdxl in str(err.value)


def test_different_vae_latent_spaces_are_refused(tiny_sd1):
    first = _load(StableDiffusionPipeline, tiny_sd1)
    other = _load(StableDiffusionPipeline, tiny_sd1)
    other.vae.register_to_config(scaling_factor=0.5)
    with pytest.raises(ValueError, match=r"pipes\[0\].*pipes\[1\].*scaling_factor"):
        SuperpositionPipeline.from_pipes([first, other])


def test_interrupt_from_the_step_callback_stops_early(pipe):
    steps_seen = []

    def stop_at_step_1(p, step, timestep, kwargs):
        steps_seen.append(step)
        assert kwargs["latents"].shape == (1, 4, 8, 8)
        if step == 1:
            p._interrupt = True
        return kwargs

    out = pipe(
        "a circle",
        num_inference_steps=5,
        generator=_gen(),
        callback_on_step_end=stop_at_step_1,
    )
    assert steps_seen == [0, 1]
    assert out.kappa.shape == (2, 2, 1)
    assert out.log_density.shape == (3, 2, 1)
    assert len(out.images) == 1


def test_bad_expert_index_and_mode_are_refused(pipe):
    with pytest.raises(ValueError, match="index 5"):
        pipe(experts=[(5, "a circle")], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="'xor'"):
        pipe("a circle", num_inference_steps=STEPS, mode="xor")


def test_loads_like_any_diffusers_pipeline_and_takes_extra_unets(tiny_sd1, sd1_pipes):
    sp = _load(SuperpositionPipeline, tiny_sd1)
    assert sp.add_unet(sd1_pipes[1].unet) == 1
    out = sp("a circle", num_inference_steps=STEPS, generator=_gen(), output_type="latent")
    assert out.images.shape == (1, 4, 8, 8)
    assert out.kappa.shape == (STEPS, 2, 1)


def test_lora_variants_as_experts_on_one_unet(tiny_sd1, tiny_lora):
    """``(unet, prompt, adapters)`` experts: one U-Net, each expert with its own adapters. With
    κ fixed to one expert (average mode, bias ±50) the image is that expert's alone."""
    base = _load(StableDiffusionPipeline, tiny_sd1)
    base.load_lora_weights(tiny_lora, adapter_name="style")  # into the U-Net the experts share
    sp = SuperpositionPipeline.from_pipes([base])
    sp.set_progress_bar_config(disable=True)

    def latents(experts, bias):
        return sp(
            experts=experts,
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            generator=_gen(2),
            mode="average",
            bias=bias,
            output_type="latent",
        ).images

    styled, plain = (0, "a circle", {"style": 1.0}), (0, "a circle", {})
    first = latents([styled, plain], [50.0, -50.0])
    second = latents([styled, plain], [-50.0, 50.0])
    torch.testing.assert_close(first, latents([styled, styled], [50.0, -50.0]))
    torch.testing.assert_close(second, latents([plain, plain], [-50.0, 50.0]))
    assert (first - second).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"adapters \['nope'\] are not loaded"):
        sp(experts=[(0, "a", {"nope": 1.0})], num_inference_steps=STEPS)


def test_sizes_off_the_latent_grid_and_unknown_callback_tensors_are_refused(pipe):
    with pytest.raises(ValueError, match=r"multiples of 2, not 16×15"):
        pipe("a", height=16, width=15)
    with pytest.raises(ValueError, match=r"\['noise'\] are not among \['latents', 'denoised'"):
        pipe("a", callback_on_step_end_tensor_inputs=["noise"])
