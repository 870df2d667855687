r"""The training objective of the aggregator (AFA, Wang et al. 2025, §3.4): the experts stay frozen,
the aggregator learns to make the ensemble's noise prediction right.

    L = E_{x₀, c, t, ε} [ w(t) · ‖ε − ε_AFA(√ᾱ_t x₀ + √(1 − ᾱ_t) ε, t, c)‖² ]

with ε_AFA the walk of ``walker.walk`` through the experts, blended by the aggregator. ``w(t)`` is 1
in the paper; ``min_snr_gamma`` gives the min-SNR-γ weighting (Hang et al. 2023, §3.3) that the toy
zoo was trained with. Gradients flow through the frozen experts' later blocks into every earlier
point's aggregator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipelines.aggregation.sabw import Aggregator, uniform_combine
from pipelines.aggregation.walker import walk


def predict_noise(
    aggregator: Aggregator | None,
    unets: Sequence[UNet2DConditionModel],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    texts: Sequence[torch.Tensor],
    added_cond_kwargs: Sequence[dict] | None = None,
    aggregator_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ensemble's prediction; ``aggregator=None`` is uniform feature averaging."""
    combine = uniform_combine if aggregator is None else aggregator.combine
    return walk(
        unets, noisy, timesteps, texts, combine, added_cond_kwargs, aggregator_text=aggregator_text
    )


def denoising_loss(
    aggregator: Aggregator,
    unets: Sequence[UNet2DConditionModel],
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    texts: Sequence[torch.Tensor],
    min_snr_gamma: float | None = None,
    added_cond_kwargs: Sequence[dict | None] | None = None,
    aggregator_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE of the aggregated prediction on x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε against what the experts
    predict: ε, or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀ for v-prediction experts (SD 2.x 768), as the
    scheduler's ``prediction_type`` says. ``added_cond_kwargs``: SDXL's pooled text and time ids,
    per expert. ``aggregator_text``: the aggregators' own prompt embedding (``walker.walk``).

    min-SNR-γ (Hang et al. 2023, §3.3) weights ε-prediction by min(SNR, γ)/SNR and
    v-prediction by min(SNR, γ)/(SNR + 1), so that both weight the x₀ error alike."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"experts predicting {kind!r} are not supported; epsilon or v_prediction")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = predict_noise(
        aggregator, unets, noisy, timesteps, texts, added_cond_kwargs, aggregator_text
    )
    per_sample = (predicted.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps]
        snr = alphas / (1 - alphas)
        denominator = snr if kind == "epsilon" else snr + 1
        per_sample = per_sample * torch.clamp(snr, max=min_snr_gamma) / denominator
    return per_sample.mean()
