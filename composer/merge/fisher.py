r"""Data-free diagonal Fisher information of a denoiser, and Fisher-weighted merging (issue 23).

Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", §3, eq. 4)
merges per parameter

    θ* = Σᵢ λᵢ Fᵢ θᵢ / (Σᵢ λᵢ Fᵢ + ε)

with Fᵢ the diagonal of model i's Fisher information: each model keeps the weights its outputs
depend on. Diffusion users have no data set at hand, so Fᵢ is estimated from the model's own
samples. A denoiser ε_θ(x_t, t, c) read as the mean of a unit Gaussian, p(y | x_t) = N(ε_θ, I),
has score ∇_θ log p(y) = Jᵀ(y − ε_θ) = Jᵀu with u = y − ε_θ ~ N(0, I), so the true Fisher's
diagonal is

    F = E_{x_t, u}[(∇_θ ⟨u, ε_θ(x_t)⟩)²]                      ("true", the default)

and the empirical Fisher replaces the model's own y by the real noise ε that made x_t:

    F̂ = E_{x_t}[(∇_θ ½‖ε − ε_θ(x_t)‖²)²]                       ("empirical").

Check on a linear model ε_θ(x) = Wx: ∇_W⟨u, Wx⟩ = u xᵀ, so F[j, k] = E[u_j²] x_k² = x_k²
(``tests/test_fisher.py`` compares the estimate with it within sampling error). Each estimate is
normalised by its mean over all parameters, so models trained at different loss scales weigh
alike; ``estimate`` costs one backward pass per sample and one fp32 accumulator per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

ESTIMATORS = ("true", "empirical")

Predict = Callable[[object], tuple[torch.Tensor, torch.Tensor]]
"""``predict(sample) -> (eps_pred, eps_true)``: the model's prediction for one sample (with
gradients) and the noise that made its input (used by the empirical estimator only)."""


def estimate(
    module: torch.nn.Module,
    predict: Predict,
    samples: Iterable[object],
    estimator: str = "true",
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``module``'s parameters (``names``, default all that require
    gradients), averaged over ``samples``, normalised to mean 1 over all of them; fp32, CPU."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    params = dict(module.named_parameters())
    chosen = [n for n in (names or params) if params[n].requires_grad]
    total = {n: torch.zeros(params[n].shape, dtype=torch.float32) for n in chosen}
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for sample in samples:
        module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            pred, true = predict(sample)
            if estimator == "true":
                u = torch.randn(pred.shape, generator=generator).to(pred.device, pred.dtype)
                objective = (u * pred).sum()
            else:
                objective = 0.5 * ((true.to(pred.dtype) - pred) ** 2).sum()
            grads = torch.autograd.grad(objective, [params[n] for n in chosen], allow_unused=True)
        for n, g in zip(chosen, grads, strict=True):
            if g is not None:
                total[n] += g.detach().float().cpu() ** 2
        count += 1
    if count == 0:
        raise ValueError("no samples to estimate the Fisher information from")
    # normalising the sum to mean 1 is normalising the average: the count cancels
    mean = sum(float(t.sum()) for t in total.values()) / max(
        1, sum(t.numel() for t in total.values())
    )
    scale = 1.0 / mean if mean > 0 else 1.0 / count
    return {n: t * scale for n, t in total.items()}


def merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""θ* = Σᵢ λᵢFᵢθᵢ / (Σᵢ λᵢFᵢ + ε) for one parameter (eq. 4); where every Fᵢ is 0 the
    weighted average Σλᵢθᵢ/Σλᵢ (what equal Fisher gives everywhere)."""
    if len(tensors) != len(fishers):
        raise ValueError(f"{len(tensors)} tensors but {len(fishers)} Fisher estimates")
    lam = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    num = torch.zeros_like(tensors[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for theta, f, w in zip(tensors, fishers, lam, strict=True):
        wf = w * f.to(num.device, torch.float32)
        num += wf * theta.float()
        den += wf
    average = sum(w * t.float() for w, t in zip(lam, tensors, strict=True)) / sum(lam)
    return torch.where(den > 0, num / (den + eps), average).to(tensors[0].dtype)


def merge_state(
    states: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """``merge`` for every parameter the Fisher estimates cover; others are averaged."""
    out = {}
    for name in states[0]:
        tensors = [s[name] for s in states]
        if all(name in f for f in fishers):
            out[name] = merge(tensors, [f[name] for f in fishers], weights)
        else:
            lam = [1.0] * len(states) if weights is None else list(weights)
            out[name] = sum(w * t.float() for w, t in zip(lam, tensors, strict=True)) / sum(lam)
            out[name] = out[name].to(tensors[0].dtype)
    return out


def unet_fisher(
    pipe,
    prompts: Sequence[str],
    n: int = 32,
    estimator: str = "true",
    seed: int = 0,
    steps: int = 20,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``pipe.unet``, data-free: ``n`` samples x₀ drawn by the pipeline
    itself from ``prompts`` (in turn, ``steps`` steps, its own scheduler, CFG 5), each noised at a
    uniform random timestep t as in training, ε_θ(x_t, t, c) read with the prompt's embedding.
    Keys are the U-Net's parameter names (fp32, CPU, mean 1)."""
    if not prompts:
        raise ValueError("the Fisher estimate needs at least one prompt to sample from")
    from diffusers import DDPMScheduler

    # noised as in training (the VP forward process at any of the 1000 training timesteps),
    # whatever the pipeline samples with
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    device = unet.device
    samples = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        with torch.no_grad():
            latents = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=5.0,
                generator=torch.Generator(device="cpu").manual_seed(seed + i),
                output_type="latent",
            ).images
            embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        samples.append((latents, embeds, t.to(device), noise))

    def predict(sample):
        latents, embeds, t, noise = sample
        noisy = scheduler.add_noise(latents, noise, t)
        return unet(noisy, t, encoder_hidden_states=embeds, return_dict=False)[0], noise

    was_training = unet.training
    unet.eval()
    try:
        return estimate(unet, predict, samples, estimator, seed)
    finally:
        unet.train(was_training)


def cache_key(model_hash: str, prompts: Sequence[str], n: int, estimator: str, seed: int) -> str:
    """What a cached estimate depends on: the model's weights (their sha256), the prompts its
    samples were drawn from, their number, the estimator and the seed."""
    import hashlib
    import json

    text = json.dumps([model_hash, list(prompts), n, estimator, seed, 1])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_unet_fisher(
    pipe,
    model_hash: str,
    prompts: Sequence[str],
    folder,
    n: int = 32,
    estimator: str = "true",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], bool]:
    """``unet_fisher`` once per model and setting: the estimate is kept as ``<folder>/<key>
    .safetensors`` (``cache_key``) and read back by every later merge. Returns it and whether it
    came from the cache."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(folder) / f"{cache_key(model_hash, prompts, n, estimator, seed)}.safetensors"
    if path.is_file():
        return load_file(str(path)), True
    params = list(pipe.unet.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        fisher = unet_fisher(pipe, prompts, n, estimator, seed)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(staged))
    staged.replace(path)  # whole or absent, never half written
    return fisher, False
