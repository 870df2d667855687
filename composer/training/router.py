"""Train a superposition router (``pipelines.superposition.router``) for a set of experts.

    python -m composer router train --experts toy-warm toy-cool --data warm/ cool/ --out my-router

``--data`` holds one folder of images per expert, in the experts' order: each expert's own kind
of pictures (what it was trained on). Images are encoded once with the first expert's VAE (the
experts must share a latent space, as superposition requires), then the router learns to tell
the folders apart from noised latents at every timestep (``router_loss``: cross-entropy, the
posterior over partitions). Resumable: it continues from ``--out`` when a router is there; it
writes ``config.json``, the weights and a card (``README.md``) with the loss and the accuracy
at a few timesteps on held-out images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from composer.recipe import RecipeError
from composer.training.data import IMAGE_SUFFIXES, encode_images


def encode_folders(pipe, folders: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (posterior means, scaled by the VAE's factor) of every folder's images and
    their folder index."""
    latents, labels = [], []
    for k, folder in enumerate(folders):
        if not folder.is_dir():
            raise RecipeError(f"--data: {str(folder)!r} is not a folder")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise RecipeError(f"--data: {str(folder)!r} holds no images")
        mean, _ = encode_images(pipe.vae, paths, size, size, pipe.device)
        latents.append(mean * pipe.vae.config.scaling_factor)
        labels.append(torch.full((len(paths),), k))
    return torch.cat(latents), torch.cat(labels)


SAVE_EVERY = 200
"""Steps between checkpoints: a run stopped at any point resumes from its last one."""


def _save(router, out: Path, figures: dict) -> None:
    """The weights, then ``training.json`` (steps done): a kill between the two resumes from
    the previous count with the newer weights, never the reverse."""
    out.mkdir(parents=True, exist_ok=True)
    router.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")


def train(
    pipe,
    experts: list[str],
    folders: list[Path],
    out: Path,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 1e-3,
    size: int | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    """Train (or continue) the router in ``out``; returns the card's figures."""
    from diffusers import DDPMScheduler

    from pipelines.superposition.router import Router, router_loss

    if len(folders) != len(experts):
        raise RecipeError(f"--data: one folder per expert ({len(experts)}), not {len(folders)}")
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents, labels = encode_folders(pipe, folders, size)
    device = latents.device
    labels = labels.to(device)
    split = torch.Generator().manual_seed(seed)  # the same held-out images on every resume
    order = torch.randperm(len(labels), generator=split)
    held = order[: max(len(labels) // 10, 1)]
    train_idx = order[len(held) :]
    if (out / "config.json").is_file() and (out / "training.json").is_file():
        router = Router.from_pretrained(out)
        done = json.loads((out / "training.json").read_text())["steps"]
        log(f"resuming from step {done} in {out}")
    else:
        router = Router(in_channels=latents.shape[1], num_experts=len(experts),
                        expert_names=tuple(experts))  # fmt: skip
        done = 0
    router.to(device)
    # fresh batches after a resume (the optimiser's moments restart, as the AFA trainer's do)
    generator = torch.Generator().manual_seed(seed + done)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    optimiser = torch.optim.AdamW(router.parameters(), lr=lr)
    start, loss = time.perf_counter(), float("nan")
    figures = {"experts": experts, "images": len(labels), "held_out": len(held), "size": size}
    router.train()
    for step in range(done, steps):
        pick = train_idx[torch.randint(0, len(train_idx), (batch,), generator=generator)]
        value = router_loss(router, latents[pick], labels[pick], alphas, generator)
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        loss = 0.98 * loss + 0.02 * float(value.detach()) if loss == loss else float(value.detach())
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {loss:.4f}")
            _save(router, out, {**figures, "steps": step + 1, "loss": round(loss, 4)})
    router.eval()
    accuracy = {}
    with torch.no_grad():
        for t in (100, 400, 700, 950):
            a = alphas[t]
            x = latents[held]
            noise = torch.randn(x.shape, generator=generator).to(x)
            noisy = a.sqrt() * x + (1 - a).sqrt() * noise
            guess = router(noisy, torch.full((len(held),), t, device=device)).argmax(1)
            accuracy[str(t)] = round(float((guess == labels[held]).float().mean()), 3)
    figures = {
        **figures,
        "steps": max(steps, done),
        "loss": round(loss, 4) if loss == loss else None,
        "held_out_accuracy_by_timestep": accuracy,
        "seconds": round(time.perf_counter() - start, 1),
    }
    _save(router, out, figures)
    (out / "README.md").write_text(
        f'# Router for {", ".join(experts)}\n\nA superposition router (`"superpose": '
        f'{{"mode": "router", "router": "{out.name}"}}`) over these experts, in this order. '
        f"Trained {figures['steps']} steps on {len(labels)} images ({size}²), one folder per "
        f"expert.\n\nHeld-out accuracy of telling the experts' images apart, by timestep (1000 = "
        f"pure noise, where it cannot): {accuracy}. Final loss {figures['loss']}.\n"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    from composer import registry

    parser = argparse.ArgumentParser(prog="python -m composer router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train a router for a set of experts")
    run.add_argument("--experts", nargs="+", required=True)
    run.add_argument("--data", nargs="+", required=True, type=Path, help="one folder per expert")
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--steps", type=int, default=2000)
    run.add_argument("--batch", type=int, default=64)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--size", type=int, default=None, help="image side (default: native)")
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    try:
        source = registry.resolve_model(args.experts[0], "--experts")
        for reference in args.experts[1:]:
            registry.resolve_model(reference, "--experts")
        with registry.CACHE.lease(source) as lease:
            train(lease.pipe, args.experts, args.data, args.out, args.steps, args.batch,
                  args.lr, args.size, args.seed)  # fmt: skip
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
