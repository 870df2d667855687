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
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from composer.training.aggregator import (
    Batch,
    Progress,
    Settings,
    aggregator_for,
    already_trained,
    draw_latents,
    read_progress,
)
from composer.training.aggregator import train as train_aggregator
from toyworld.captions import captions, scene_caption
from toyworld.render import render_scene
from toyworld.train import (
    MIN_SNR_GAMMA,
    OFFSET_NOISE,
    draw_captions,
    encode_latents,
    encode_prompts,
    render_domain,
)
from toyworld.zoo import DOMAINS, TRAIN_SCHEDULER

EXPERTS = ("toy-warm", "toy-cool")
CONFIG = {"width": 32, "heads": 4, "depth": 1, "groups": 8, "position_channels": 2}
DEFAULTS = {"steps": 2000, "batch": 32, "lr": 1e-3, "singles": 4000, "scenes": 6000}
ONE, SCENES = "one-object", "scenes"


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


def card(stats: dict) -> str:
    """The aggregator's README: data, settings, time, losses and what was measured since."""
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
    return "\n".join(lines) + "\n"


def train(out: Path, assets: Path, steps: int, batch: int, lr: float, singles: int, scenes: int,
          seed: int, save_every: int, log) -> dict:  # fmt: skip
    state = read_progress(out)
    if already_trained(state, steps, out, log):
        return state
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
    aggregator = aggregator_for(unets, list(EXPERTS), CONFIG, out, state, log)
    draw = ToyBatches(vae, tokenizer, text_encoder, singles, scenes, batch, seed, device)
    log(f"data: {singles} one-object images, {scenes} scenes")
    settings = Settings(steps, batch, lr, seed, save_every, MIN_SNR_GAMMA, OFFSET_NOISE, 50)

    def record(progress: Progress) -> dict:
        return {
            "experts": list(EXPERTS),
            "config": progress.config,
            "parameters": progress.parameters,
            "step": progress.step,
            "steps": steps,
            "batch": batch,
            "lr": lr,
            "runs": progress.runs,
            "singles": singles,
            "scenes": scenes,
            "seed": seed,
            "seconds": progress.seconds,
            "device": progress.device,
            "loss_single": progress.loss(ONE, float(state.get("loss_single", 0))),
            "loss_scene": progress.loss(SCENES, float(state.get("loss_scene", 0))),
        }

    return train_aggregator(aggregator, unets, DDPMScheduler(**TRAIN_SCHEDULER), draw, settings,
                            out, accelerator=accelerator, state=state, record=record, card=card,
                            log=log)  # fmt: skip


class ToyBatches:
    """Batches that alternate one-object images (each expert and the aggregators read the
    image's caption, one of its full and partial captions, empty 10 % of the time) and scenes
    (each expert reads its own object's caption, the aggregators the scene's; all empty 10 %
    of the time). Every caption is encoded once, ahead."""

    def __init__(self, vae, tokenizer, text_encoder, singles: int, scenes: int, batch: int,
                 seed: int, device) -> None:  # fmt: skip
        single_images, self.pairs = single_data(singles, seed)
        scene_images, self.scene_texts, self.scene_parts = scene_data(scenes, seed + 7)
        self.single = encode_latents(vae, single_images, device)
        self.scene = encode_latents(vae, scene_images, device)
        unique = sorted(
            {c for color, shape in self.pairs for c in captions(color, shape)}
            | set(self.scene_texts)
            | {part for both in self.scene_parts for part in both}
            | {""}
        )
        self.table = encode_prompts(tokenizer, text_encoder, unique).cpu()
        self.index = {p: i for i, p in enumerate(unique)}
        self.batch, self.scale, self.device = batch, vae.config.scaling_factor, device

    def __call__(self, step: int, gen: torch.Generator, rng: np.random.Generator) -> Batch:
        kind = SCENES if step % 2 else ONE
        mean, std = self.scene if kind == SCENES else self.single
        z0, idx = draw_latents(mean, std, self.batch, gen, self.scale)
        if kind == SCENES:
            drop = [rng.random() < 0.1 for _ in idx]
            texts = ["" if d else self.scene_texts[i] for d, i in zip(drop, idx, strict=True)]
            per_expert = [
                ["" if d else self.scene_parts[i][k] for d, i in zip(drop, idx, strict=True)]
                for k in range(len(EXPERTS))
            ]
        else:
            texts = draw_captions([captions(*self.pairs[i]) for i in idx], rng)
            per_expert = [texts] * len(EXPERTS)
        whole = self.table[[self.index[t] for t in texts]].to(self.device)
        conds = [self.table[[self.index[t] for t in part]].to(self.device) for part in per_expert]
        return Batch(z0, conds, None, whole, kind)


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
