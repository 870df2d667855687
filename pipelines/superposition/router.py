r"""A learned router over experts (Decentralized Diffusion Models, McAllister et al. 2025, §3).

Experts trained on separate data partitions k = 1…K are ensembled at every step by a router
that predicts which partition the noisy sample came from:

    ε(x_t, t) = Σₖ rₖ(x_t, t) εₖ(x_t, t),   rₖ(x_t, t) ≈ p(k | x_t).

With εₖ the score of partition k's noised data (εₖ = −σₜ∇log pₖ,ₜ) and prior πₖ, the score of the
union Σₖ πₖ pₖ,ₜ is Σₖ p(k | x_t) ∇log pₖ,ₜ: the router is the posterior over partitions, and a
classifier trained with cross-entropy on (x_t, t, k) estimates exactly that. It is the learned
counterpart of SuperDiff's OR, whose κ = softmax(log qᵢ) computes the same posterior from an
Itô density estimate without training (``sampler.or_weights``).

``Router`` reads the VP-scaled latent x_t (what a U-Net reads, before ``scale_model_input``) and
the training timestep t; ``router_loss`` is its training objective on clean latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the timestep t ∈ [0, 1000), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float().reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Router(ModelMixin, ConfigMixin):
    """A small convolutional classifier r(x_t, t) → logits over ``num_experts`` partitions."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        num_experts: int = 2,
        width: int = 32,
        time_dim: int = 32,
        expert_names: tuple[str, ...] = (),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.time = nn.Linear(time_dim, width)
        self.head = nn.Linear(2 * width, num_experts)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for VP latents ``x`` (B, C, h, w) at timesteps ``t`` (B,) or scalar."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time(timestep_features(t.to(x.device), self.config.time_dim)).to(x.dtype)
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h) + emb[:, :, None, None])
        h = F.silu(self.conv3(h))
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)
        return self.head(pooled)

    def weights(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """r(x_t, t) as superposition weights κ (K, B), float64."""
        return torch.softmax(self(x, t).double(), dim=1).T


def router_loss(
    router: Router,
    latents: torch.Tensor,
    labels: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-entropy of the router on clean ``latents`` (B, C, h, w) of partitions ``labels``
    (B,), noised as in training at uniform random timesteps: x_t = √ᾱ x₀ + √(1 − ᾱ) ε."""
    b = latents.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    a = alphas_cumprod[t].to(latents).reshape(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    return F.cross_entropy(router(noisy, t.to(latents.device)), labels)
