"""Train the bundled AFA aggregator ``toy-warm-cool`` for ``toy-warm`` + ``toy-cool``.

    python -m toyworld.train_aggregator --out assets/aggregators/toy-warm-cool [--steps N]

The experts stay frozen; only the SABW aggregators (``pipelines.aggregation``) learn, with the
ε-MSE of the aggregated prediction (min-SNR-γ weighted and with offset noise, as the zoo was
trained), AdamW, 10 % caption drop, accelerate (the GPU when there is one). Half the steps see
one-object images of either expert's domain (red/yellow or green/blue shapes at 32×32), half see
two-object scenes at 64×32 with one warm and one cool object ("a red circle and a blue square":
the left object is named first). In a scene each expert reads its own object's caption ("a red
circle" for toy-warm, "a blue square" for toy-cool) and the aggregators read the scene's, which
says which side each goes on. Neither expert has seen a scene or the other's colours: only an
aggregator that routes each half of the frame to the right expert can denoise them.

Every ``--save-every`` steps the aggregator is written to ``--out`` with a ``training.json`` that
records the step reached; running the same command again resumes from there (the optimizer's
moments restart, which AdamW recovers from within a few dozen steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.aggregation import Aggregator
from pipelines.aggregation.training import denoising_loss
from toyworld.captions import captions, scene_caption
from toyworld.render import render_scene
from toyworld.train import (
    DOMAINS,
    MIN_SNR_GAMMA,
    OFFSET_NOISE,
    TRAIN_SCHEDULER,
    describe_device,
    draw_captions,
    encode_latents,
    encode_prompts,
    render_domain,
)

EXPERTS = ("toy-warm", "toy-cool")
CONFIG = {"width": 32, "heads": 4, "depth": 1, "groups": 8, "position_channels": 2}
DEFAULTS = {"steps": 2000, "batch": 32, "lr": 1e-3, "singles": 4000, "scenes": 6000}


def scene_data(n: int, seed: int) -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """``n`` two-object scenes (one warm, one cool object, either side) in [-1, 1], their
    captions, and per scene what each expert reads: its own object's caption."""
    rng = np.random.default_rng(seed)
    warm, cool = DOMAINS["warm"], DOMAINS["cool"]
    images, texts, parts = [], [], []
    for i in range(n):
        a = (str(rng.choice(warm.colors)), str(rng.choice(warm.shapes)))
        b = (str(rng.choice(cool.colors)), str(rng.choice(cool.shapes)))
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        images.append(np.asarray(render_scene(left, right, seed * 1_000_000 + i)))
        texts.append(scene_caption(left, right))
        parts.append([captions(*a)[0], captions(*b)[0]])  # in EXPERTS' order: warm, cool
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, texts, parts


def single_data(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """``n`` one-object images, half from each expert's domain."""
    warm, warm_pairs = render_domain(DOMAINS["warm"], n // 2, seed)
    cool, cool_pairs = render_domain(DOMAINS["cool"], n - n // 2, seed + 1)
    return torch.cat([warm, cool]), warm_pairs + cool_pairs


def write_card(out: Path, stats: dict) -> None:
    lines = [
        "# toy-warm-cool: an AFA aggregator for toy-warm + toy-cool",
        "",
        "Spatial-Aware Block-Wise aggregators (Wang et al., ICLR 2025) at every block of the two",
        "toy U-Nets, trained with the experts frozen (`python -m toyworld.train_aggregator`).",
        "",
        f"- Experts, in order: {', '.join(stats['experts'])}",
        f"- Data: {stats['singles']} one-object images (half red/yellow, half green/blue shapes, "
        f"32×32) and {stats['scenes']} two-object scenes (64×32, one warm and one cool object; "
        "each expert reads its own object's caption, the aggregators the scene's)",
        f"- Aggregator: {json.dumps(stats['config'])}, {stats['parameters']:,} parameters",
        f"- Steps: {stats['step']} of batch {stats['batch']}, AdamW lr "
        + ", ".join(f"{r['lr']} from step {r['from_step']}" for r in stats["runs"])
        + ", "
        f"min-SNR-γ {MIN_SNR_GAMMA}, offset noise {OFFSET_NOISE}, 10 % caption drop",
        f"- Time: {stats['seconds'] / 60:.1f} min on {stats['device']}",
        f"- Final loss (mean of the last 50 steps of each kind): one object "
        f"{stats['loss_single']:.4f}, "
        f"scenes {stats['loss_scene']:.4f}",
    ]
    if stats["step"] < stats["steps"]:
        lines.append(
            f"- Stopped at step {stats['step']} of {stats['steps']}; the same command resumes"
        )
    if "results" in stats:
        lines += ["", "## Measured", "", *stats["results"]]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def train(out: Path, assets: Path, steps: int, batch: int, lr: float, singles: int, scenes: int,
          seed: int, save_every: int, log) -> dict:  # fmt: skip
    accelerator = Accelerator()
    device = accelerator.device
    torch.manual_seed(seed)
    models = assets / "models"
    shared = models / EXPERTS[0]
    vae = AutoencoderKL.from_pretrained(shared / "vae").to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(shared / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(shared / "text_encoder").to(device).eval()
    unets = [
        UNet2DConditionModel.from_pretrained(models / name / "unet").to(device).eval()
        for name in EXPERTS
    ]
    for unet in unets:
        unet.requires_grad_(False)

    progress_file = out / "training.json"
    state = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if state.get("step", 0) >= steps:
        log(f"{out} already trained for {state['step']} steps")
        return state
    if state:
        aggregator = Aggregator.from_pretrained(out)
        aggregator.check_experts(unets, list(EXPERTS))
        log(f"resuming at step {state['step']}")
    else:
        aggregator = Aggregator.for_unets(unets, list(EXPERTS), **CONFIG)
    aggregator.to(device).train()

    single_images, pairs = single_data(singles, seed)
    scene_images, scene_texts, scene_parts = scene_data(scenes, seed + 7)
    single_mean, single_std = encode_latents(vae, single_images, device)
    scene_mean, scene_std = encode_latents(vae, scene_images, device)
    unique = sorted(
        {c for color, shape in pairs for c in captions(color, shape)}
        | set(scene_texts)
        | {part for both in scene_parts for part in both}
        | {""}
    )
    table = encode_prompts(tokenizer, text_encoder, unique).cpu()
    index = {p: i for i, p in enumerate(unique)}
    log(f"data: {len(single_images)} one-object images, {len(scene_images)} scenes")

    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=lr, weight_decay=0.0)
    aggregator, optimizer = accelerator.prepare(aggregator, optimizer)
    scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    scale = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed + state.get("step", 0))
    rng = np.random.default_rng(seed + state.get("step", 0))
    losses: dict[str, list[float]] = {"single": [], "scene": []}
    start, elapsed = time.time(), state.get("seconds", 0.0)
    step = first_step = state.get("step", 0)

    def save() -> dict:
        record = {
            "experts": list(EXPERTS),
            "config": CONFIG,
            "parameters": sum(p.numel() for p in aggregator.parameters()),
            "step": step,
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "runs": [*state.get("runs", []), {"from_step": first_step, "lr": lr}],
            "singles": singles,
            "scenes": scenes,
            "seed": seed,
            "seconds": round(elapsed + time.time() - start, 1),
            "device": describe_device(device),
            "loss_single": float(np.mean(losses["single"][-50:] or [state.get("loss_single", 0)])),
            "loss_scene": float(np.mean(losses["scene"][-50:] or [state.get("loss_scene", 0)])),
        }
        accelerator.unwrap_model(aggregator).save_pretrained(out)
        progress_file.write_text(json.dumps(record, indent=2) + "\n")
        write_card(out, record)
        return record

    while step < steps:
        kind = "scene" if step % 2 else "single"
        mean, std = (scene_mean, scene_std) if kind == "scene" else (single_mean, single_std)
        idx = torch.randint(len(mean), (batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        if kind == "scene":
            drop = [rng.random() < 0.1 for _ in idx]
            texts = ["" if d else scene_texts[i] for d, i in zip(drop, idx, strict=True)]
            per_expert = [
                ["" if d else scene_parts[i][k] for d, i in zip(drop, idx, strict=True)]
                for k in range(len(EXPERTS))
            ]
        else:
            texts = draw_captions([captions(*pairs[i]) for i in idx], rng)
            per_expert = [texts] * len(EXPERTS)
        whole = table[[index[t] for t in texts]].to(device)
        conds = [table[[index[t] for t in part]].to(device) for part in per_expert]
        noise = torch.randn(z0.shape, generator=gen)
        noise += OFFSET_NOISE * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        loss = denoising_loss(
            aggregator, unets, scheduler, z0.to(device), noise.to(device), t.to(device),
            conds, min_snr_gamma=MIN_SNR_GAMMA, aggregator_text=whole,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        losses[kind].append(loss.item())
        step += 1
        if step % 50 == 0 or step == steps:
            rate = (time.time() - start) / max(step - state.get("step", 0), 1)
            log(
                f"aggregator step {step}/{steps} loss one-object "
                f"{np.mean(losses['single'][-25:]):.4f} scenes {np.mean(losses['scene'][-25:]):.4f}"
                f" ({rate:.2f} s/step)"
            )
        if step % save_every == 0 or step == steps:
            save()
    return save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.train_aggregator", description=__doc__
    )
    parser.add_argument("--out", default="assets/aggregators/toy-warm-cool")
    parser.add_argument("--assets", default="assets", help="folder holding models/toy-warm, …")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train(out, Path(args.assets), args.steps, args.batch, args.lr, args.singles, args.scenes,
          args.seed, args.save_every, lambda m: print(m, flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
