"""AggregationPipeline (pipelines/aggregation/pipeline.py) on tiny random SD 1.x / SDXL models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from pipelines.aggregation import AggregationPipeline, Aggregator

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


def _run(pipe, seed=0, **kwargs):
    return pipe(
        "a red circle",
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_one_expert_equals_the_plain_pipeline(family, tiny_sd1, tiny_sdxl):
    cls = StableDiffusionPipeline if family == "sd1" else StableDiffusionXLPipeline
    plain = _load(cls, tiny_sd1 if family == "sd1" else tiny_sdxl)
    ensemble = AggregationPipeline.from_pipes([plain])
    ensemble.set_progress_bar_config(disable=True)
    expected = _run(plain).images
    got = _run(ensemble).images
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_any_scheduler_and_identical_experts_equal_one(tiny_sd1):
    plain = _load(StableDiffusionPipeline, tiny_sd1)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)
    ensemble = AggregationPipeline.from_pipes([plain, plain])
    ensemble.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(ensemble).images, _run(plain).images, atol=1e-5)


def test_maps_cover_every_point_and_sum_to_one(tiny_sd1, tiny_sd1_other):
    pipes = [_load(StableDiffusionPipeline, p) for p in (tiny_sd1, tiny_sd1_other)]
    aggregator = Aggregator.for_unets(
        [p.unet for p in pipes], ["a", "b"], width=8, heads=2, groups=4, position_channels=2
    )
    with torch.no_grad():  # a trained-looking aggregator: non-uniform weights
        for sabw in aggregator.points:
            sabw.proj_out.weight.normal_(0, 1.0)
    ensemble = AggregationPipeline.from_pipes(pipes, aggregator, names=["a", "b"])
    ensemble.set_progress_bar_config(disable=True)
    out = _run(ensemble, num_images_per_prompt=2, return_maps=True)
    assert out.images.shape == (2, 16, 16, 3)
    assert out.point_names[0] == "conv_in" and out.point_names[-1] == "head"
    assert len(out.maps) == len(out.point_names)
    for m in out.maps:
        assert m.shape[:3] == (STEPS, 2, 2)
        torch.testing.assert_close(
            m.float().sum(2), torch.ones_like(m[:, :, 0].float()), atol=2e-3, rtol=0
        )
    assert out.maps[-1].shape[-2:] == (8, 8)
    assert out.maps[0].float().std() > 0.05
    # the same seed gives the same pixels; uniform averaging gives other ones
    again = _run(ensemble, num_images_per_prompt=2)
    np.testing.assert_array_equal(again.images, out.images)
    ensemble.aggregator = None
    assert np.abs(_run(ensemble, num_images_per_prompt=2).images - out.images).max() > 1e-3


def test_each_expert_uses_its_own_text_encoder(tiny_sd1, tiny_sd1_other):
    """Expert 2's prompt embedding comes from its own text encoder, not the first's."""
    a, b = (_load(StableDiffusionPipeline, p) for p in (tiny_sd1, tiny_sd1_other))
    ensemble = AggregationPipeline.from_pipes([a, b])
    texts, _ = ensemble._encode(["a red circle"] * 2, None, 1, False, 16, 16, torch.device("cpu"))
    (own_b,) = b.encode_prompt("a red circle", "cpu", 1, False)[:1]
    torch.testing.assert_close(texts[1], own_b)
    assert not torch.allclose(texts[0], texts[1])


def test_mismatched_experts_and_aggregators_are_refused(tiny_sd1, tiny_sd1_other, tiny_sdxl):
    sd1, other = (_load(StableDiffusionPipeline, p) for p in (tiny_sd1, tiny_sd1_other))
    sdxl = _load(StableDiffusionXLPipeline, tiny_sdxl)
    with pytest.raises(ValueError, match="sd1 and sdxl have different architectures"):
        AggregationPipeline.from_pipes([sd1, sdxl], names=["sd1", "sdxl"])
    aggregator = Aggregator.for_unets([sd1.unet, other.unet], ["one", "two"], width=8, heads=2,
                                      groups=4)  # fmt: skip
    with pytest.raises(ValueError, match="trained for one, two in that order"):
        AggregationPipeline.from_pipes([other, sd1], aggregator, names=["two", "one"])


def test_aggregator_prompt_reaches_the_aggregators_only(tiny_sd1, tiny_sd1_other):
    """Experts read their own prompts; the aggregators read ``aggregator_prompt``, encoded by
    every expert's text encoder and averaged (the mean of the experts' prompts without it)."""
    pipes = [_load(StableDiffusionPipeline, p) for p in (tiny_sd1, tiny_sd1_other)]
    aggregator = Aggregator.for_unets(
        [p.unet for p in pipes], ["a", "b"], width=8, heads=2, groups=4, position_channels=2
    )
    with torch.no_grad():
        for sabw in aggregator.points:
            sabw.proj_out.weight.normal_(0, 1.0)
    ensemble = AggregationPipeline.from_pipes(pipes, aggregator, names=["a", "b"])
    ensemble.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    combine = aggregator.combine

    def spy(index, features, context, maps=None):
        if index == 0:
            seen.append(context.text)
        return combine(index, features, context, maps)

    aggregator.combine = spy
    parts, whole = ["a red circle", "a blue square"], "a red circle and a blue square"

    def run(**kwargs):
        return ensemble(
            parts,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        ).images

    own = run(aggregator_prompt=whole)
    cpu = torch.device("cpu")
    expected = torch.stack(ensemble._encode([whole] * 2, None, 1, True, 16, 16, cpu)[0]).mean(0)
    torch.testing.assert_close(seen[-1], expected)
    mean = run()
    experts = ensemble._encode(parts, None, 1, True, 16, 16, cpu)[0]
    torch.testing.assert_close(seen[-1], torch.stack(experts).mean(0))
    assert np.abs(own - mean).max() > 1e-3
    # uniform averaging has no aggregator to read it: the prompt changes nothing
    ensemble.aggregator = None
    np.testing.assert_array_equal(run(aggregator_prompt=whole), run())


def test_initial_latents_are_drawn_as_stable_diffusion_draws_them(tiny_sd1):
    plain = _load(StableDiffusionPipeline, tiny_sd1)
    ensemble = AggregationPipeline.from_pipes([plain, plain])
    plain.scheduler.set_timesteps(STEPS)
    assert ensemble.scheduler.init_noise_sigma > 1

    def draw(pipe):
        gen = torch.Generator().manual_seed(3)
        return pipe.prepare_latents(2, 4, 24, 16, torch.float32, torch.device("cpu"), gen)

    assert torch.equal(draw(ensemble), draw(plain))


def test_sizes_off_the_latent_grid_and_unknown_callback_tensors_are_refused(tiny_sd1):
    ensemble = AggregationPipeline.from_pipes([_load(StableDiffusionPipeline, tiny_sd1)])
    with pytest.raises(ValueError, match=r"multiples of 2, not 21×16"):
        ensemble("a", height=21, width=16)
    with pytest.raises(ValueError, match=r"\['kappa'\] are not among \['latents'\]"):
        ensemble("a", callback_on_step_end_tensor_inputs=["kappa"])
