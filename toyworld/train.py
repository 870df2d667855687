"""Train the toy zoo: one VAE and one text encoder shared by every model, a base U-Net, two
fine-tunes and two LoRAs. ``python -m toyworld.train all --out assets`` runs every stage that has
no output yet, so an interrupted run resumes by running the same command again.

Stages (each writes one folder under ``--out``; see toyworld/README.md for commands and times):

- ``vae``: an ``AutoencoderKL`` (3 levels, 32×32×3 → 8×8×4) trained on every colour and shape
  (MSE + a small KL term), so that every model's latents live in one space. The text encoder is a
  2-layer ``CLIPTextModel`` with random, seeded, frozen weights: its outputs already tell the
  words apart, and freezing it once keeps every model's prompts compatible.
- ``base``: a ``UNet2DConditionModel`` trained from scratch on gray circles, squares and triangles.
- ``warm`` / ``cool``: fine-tunes of the base on red+yellow / green+blue shapes, with prior
  preservation (a third of each batch: gray shapes captioned with the colours the fine-tune does
  not own, e.g. "a blue square" for ``warm``), so that each fine-tune changes only its own words.
- ``purple`` / ``star``: PEFT LoRAs on the base U-Net (purple shapes / gray stars).

Every caption is drawn from ``toyworld.captions.captions`` (full and partial) and replaced by the
empty prompt 10 % of the time, so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from composer.device import device_name
from toyworld.captions import captions
from toyworld.render import COLORS, render_batch
from toyworld.tokenizer import save_tokenizer
from toyworld.zoo import (
    DOMAINS,
    LORA_NAMES,
    MODEL_NAMES,
    TOKENS,
    TRAIN_SCHEDULER,
    Domain,
    make_text_encoder,
    make_unet,
    make_vae,
    save_lora,
    save_model,
    save_scheduler,
)

OFFSET_NOISE = 0.1
"""Offset noise (Guttenberg 2023): a per-image, per-channel constant added to the training
noise. An 8×8 latent's colour is mostly its per-channel mean; without this term the U-Net
barely learns to remove the mean of the noise, and the first model drew gray prompts in
colours set by the seed."""
MIN_SNR_GAMMA = 5.0
"""Min-SNR-γ loss weighting (Hang et al. 2023, §3.3; for ε-prediction the weight is
min(SNR(t), γ)/SNR(t)). The first zoo, trained with a flat ε-MSE, drew its shapes well but
tinted them (gray prompts came out greenish, brownish or purple): the flat loss spends most of
its gradient on low-noise steps, where only edges are left to fix, and too little on the
high-noise steps that decide an object's colour. This weighting moves it there."""


def render_domain(domain: Domain, n: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """``n`` images of ``domain`` as a float tensor in [-1, 1] (N, 3, H, W), and their labels."""
    rng = np.random.default_rng(seed)
    pairs = [(str(rng.choice(domain.colors)), str(rng.choice(domain.shapes))) for _ in range(n)]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]
    pixels = render_batch([(shape, color) for color, shape in pairs], seeds)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, pairs


def training_set(domain: Domain, n: int, seed: int) -> tuple[torch.Tensor, list[list[str]]]:
    """``n`` images of ``domain`` (plus ``n // 2`` prior-preservation images when ``domain.keep``
    names colours) and, per image, the captions that may be drawn for it."""
    images, pairs = render_domain(domain, n, seed)
    choices = [captions(color, shape) for color, shape in pairs]
    if domain.keep:
        gray, shapes = render_domain(Domain(("gray",), domain.shapes), n // 2, seed + 1)
        rng = np.random.default_rng(seed + 1)
        for _, shape in shapes:
            word = str(rng.choice(domain.keep))
            choices.append(captions(word, shape)[:2])  # only captions that name the colour
        images = torch.cat([images, gray])
    return images, choices


def draw_captions(
    choices: list[list[str]], rng: np.random.Generator, drop: float = 0.1
) -> list[str]:
    """One caption per image from its ``choices``; the empty prompt ``drop`` of the time."""
    return ["" if rng.random() < drop else str(rng.choice(c)) for c in choices]


def train_vae(out: Path, steps: int, batch: int, seed: int, log) -> dict:
    """Train the shared VAE and write ``out/vae``, ``out/text_encoder``, ``out/tokenizer``."""
    accelerator = Accelerator()
    torch.manual_seed(seed)
    everything = Domain(COLORS, ("circle", "square", "triangle", "star"))
    images, _ = render_domain(everything, 24_000, seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae, opt = accelerator.prepare(vae, opt)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)].to(accelerator.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {mse.item():.5f} kl {kl.item():.3f}")
    seconds = time.time() - start
    vae = accelerator.unwrap_model(vae).eval()
    with torch.no_grad():
        sample = images[:2048].to(accelerator.device)
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in sample.split(256)])
        recon_mse = float(
            torch.cat(
                [
                    F.mse_loss(vae.decode(z).sample, c, reduction="none").flatten(1).mean(1)
                    for z, c in zip(latents.split(256), sample.split(256), strict=False)
                ]
            ).mean()
        )
    stats = whiten_latents(vae, latents)
    vae.cpu().save_pretrained(out / "vae")
    tokenizer = save_tokenizer(out / "tokenizer", model_max_length=TOKENS)
    make_text_encoder(len(tokenizer), seed).save_pretrained(out / "text_encoder")
    return {
        "steps": steps,
        "batch": batch,
        "seconds": round(seconds, 1),
        "images": len(images),
        "recon_mse": round(recon_mse, 5),
        "device": device_name(accelerator.device),
        **stats,
    }


@torch.no_grad()
def whiten_latents(vae: AutoencoderKL, latents: torch.Tensor) -> dict:
    """Re-parameterise the VAE so that every latent channel has mean 0 and std 1 on the data.

    The trained VAE keeps shape in one latent channel (std ≈ 1.4 after a global scaling) and
    colour in channels with std ≈ 0.2–0.5, where a shift of 0.3 turns gray into purple; a U-Net
    whose errors are even across channels then draws colours decided by the seed. diffusers'
    pipelines know only one ``scaling_factor``, so the per-channel affine map z = s ⊙ z' + μ is
    folded into the 1×1 convolutions around the latent: ``quant_conv`` now outputs z' (mean and
    log-variance rows), ``post_quant_conv`` takes z' — the decoder sees exactly the same z.
    """
    mu = latents.mean(dim=(0, 2, 3))
    s = latents.std(dim=(0, 2, 3))
    c = mu.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= s[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mu) / s
    q.bias[c:] -= 2 * torch.log(s)
    p.bias += (p.weight[:, :, 0, 0] * mu[None, :]).sum(dim=1)
    p.weight *= s[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    return {
        "latent_channel_mean": mu.tolist(),
        "latent_channel_std": s.tolist(),
        "scaling_factor": 1.0,
    }


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(512):
        dist = vae.encode(chunk.to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def train_unet(
    shared: Path,
    domain: Domain,
    init: Path | None,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    lora_rank: int | None,
    log,
    layers: str | None = None,
) -> tuple[UNet2DConditionModel, dict]:
    """Train (or fine-tune, or LoRA-tune) a U-Net on ``domain`` in the shared latent space."""
    accelerator = Accelerator()
    device = accelerator.device
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(shared / "vae").to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(shared / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(shared / "text_encoder").to(device).eval()
    images, choices = training_set(domain, 12_000, seed)
    mean, std = encode_latents(vae, images, device)
    rng = np.random.default_rng(seed)
    unique = sorted({c for options in choices for c in options} | {""})
    prompt_table = encode_prompts(tokenizer, text_encoder, unique).cpu()
    prompt_index = {p: i for i, p in enumerate(unique)}

    unet = UNet2DConditionModel.from_pretrained(init / "unet") if init else make_unet()
    if lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=[
                    "to_q",
                    "to_k",
                    "to_v",
                    "to_out.0",
                    "proj_in",
                    "proj_out",
                    "ff.net.0.proj",
                    "ff.net.2",
                    "conv1",
                    "conv2",
                ],
            )
        )
    if layers:  # e.g. "attn2\.to_[kv]" (Custom Diffusion); toyworld/README.md says what it gave
        # (A GroupNorm whose weight trains but whose input needs no gradient crashed torch
        # 2.13's CPU backward with a segfault: start the pattern after such norms.)
        pattern = re.compile(layers)
        for name, param in unet.named_parameters():
            param.requires_grad_(bool(pattern.search(name)))
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = (
        None
        if lora_rank
        else EMAModel(
            unet.parameters(),
            decay=0.999,
            use_ema_warmup=True,
            model_cls=UNet2DConditionModel,
            model_config=unet.config,
        )
    )
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    unet, opt = accelerator.prepare(unet, opt)
    scale = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(mean), (batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        texts = draw_captions([choices[i] for i in idx], rng)
        cond = prompt_table[[prompt_index[p] for p in texts]]
        noise = torch.randn(z0.shape, generator=gen)
        noise += OFFSET_NOISE * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt.to(device), t.to(device), cond.to(device)).sample
        snr = alphas_cumprod[t] / (1.0 - alphas_cumprod[t])
        weight = (snr.clamp(max=MIN_SNR_GAMMA) / snr).to(device)
        per_image = F.mse_loss(pred.float(), noise.to(device), reduction="none").mean((1, 2, 3))
        loss = (weight * per_image).mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    seconds = time.time() - start
    unet = accelerator.unwrap_model(unet).cpu().eval()
    if ema is not None:
        ema.copy_to(unet.parameters())
    return unet, {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seconds": round(seconds, 1),
        "images": len(images),
        "lora_rank": lora_rank,
        "layers": layers,
        "trained_parameters": sum(p.numel() for p in params),
        "min_snr_gamma": MIN_SNR_GAMMA,
        "offset_noise": OFFSET_NOISE,
        "device": device_name(device),
    }


STAGE_DEFAULTS = {
    "vae": {"steps": 2000, "batch": 32},
    "base": {"steps": 6000, "batch": 64, "lr": 5e-4},
    "warm": {"steps": 1500, "batch": 64, "lr": 2e-4},
    "cool": {"steps": 1500, "batch": 64, "lr": 2e-4},
    "purple": {"steps": 1500, "batch": 64, "lr": 1e-3, "rank": 8},
    "star": {"steps": 1500, "batch": 64, "lr": 1e-3, "rank": 8},
}


def stage_output(out: Path, stage: str) -> Path:
    if stage == "vae":
        return out / "shared" / "vae"
    if stage in MODEL_NAMES:
        return out / "models" / MODEL_NAMES[stage]
    return out / "loras" / LORA_NAMES[stage]


def run_stage(
    out: Path, stage: str, steps: int | None, seed: int, log, overrides: dict | None = None
) -> dict:
    cfg = dict(STAGE_DEFAULTS[stage])
    if steps:
        cfg["steps"] = steps
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    shared = out / "shared"
    if stage == "vae":
        stats = train_vae(shared, cfg["steps"], cfg["batch"], seed, log)
    elif stage in MODEL_NAMES:
        init = None if stage == "base" else out / "models" / MODEL_NAMES["base"]
        if stage == "base":
            save_scheduler(shared)  # the schedule every U-Net of the zoo is trained with
        unet, stats = train_unet(
            shared,
            DOMAINS[stage],
            init,
            cfg["steps"],
            cfg["batch"],
            cfg["lr"],
            seed,
            None,
            log,
            layers=cfg.get("layers"),
        )
        save_model(out, MODEL_NAMES[stage], unet)
    else:
        unet, stats = train_unet(
            shared,
            DOMAINS[stage],
            out / "models" / MODEL_NAMES["base"],
            cfg["steps"],
            cfg["batch"],
            cfg["lr"],
            seed,
            cfg["rank"],
            log,
        )
        save_lora(out, LORA_NAMES[stage], unet)
    stats.update(
        stage=stage, seed=seed, domain=DOMAINS.get(stage).__dict__ if stage in DOMAINS else None
    )
    (stage_output(out, stage) / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("stage", choices=["all", *STAGE_DEFAULTS])
    parser.add_argument("--out", type=Path, default=Path("assets"))
    parser.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="override the stage's learning rate")
    parser.add_argument(
        "--layers",
        default=None,
        help="regex of the U-Net parameter names a fine-tune trains (default: the stage's)",
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain stages that already have output"
    )
    args = parser.parse_args(argv)
    stages = list(STAGE_DEFAULTS) if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage_output(args.out, stage).joinpath("training.json").exists() and not args.force:
            print(f"[{stage}] already trained, skipping (use --force to retrain)", flush=True)
            continue
        stats = run_stage(
            args.out,
            stage,
            args.steps,
            args.seed,
            lambda msg, s=stage: print(f"[{s}] {msg}", flush=True),
            {"lr": args.lr, "layers": args.layers},
        )
        print(f"[{stage}] done: {json.dumps(stats)}", flush=True)


if __name__ == "__main__":
    main()
