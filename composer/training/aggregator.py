"""The one training loop of AFA aggregators (Wang et al. 2025, §3.4), for the users' command line
(``composer.training.cli``) and the toy zoo's script (``toyworld.train_aggregator``).

The experts stay frozen; the aggregator learns to make the blended noise prediction right
(``pipelines.aggregation.training.denoising_loss``: ε- or v-MSE, optionally min-SNR-γ weighted,
Hang et al. 2023), with offset noise (Guttenberg 2023), AdamW and accelerate (the GPU when there
is one). What differs between callers is where batches come from (a ``draw`` function) and what
their ``training.json`` and card say (``record`` and ``card``); the loop saves every
``save_every`` steps and resumes from the saved step, its random streams seeded with
``seed + step`` so that a resumed run draws fresh batches (the optimizer's moments restart,
which AdamW recovers from within a few dozen steps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from composer.device import device_name
from composer.recipe import RecipeError
from pipelines.aggregation import Aggregator, training

ARCHITECTURE = ("width", "heads", "depth", "groups", "position_channels")
PROGRESS_FILE = "training.json"


@dataclass(frozen=True)
class Settings:
    """How long and how fast to train, and how often to save and log."""

    steps: int
    batch: int
    lr: float
    seed: int
    save_every: int
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    log_every: int = 25


@dataclass
class Batch:
    """One step's clean latents x₀ (on the CPU), each expert's text conditioning, SDXL's added
    conditioning per expert (else ``None``), the aggregators' own text and the batch's ``kind``
    (losses are averaged per kind for logs and records)."""

    latents: torch.Tensor
    texts: list[torch.Tensor]
    added: list[dict | None] | None
    whole: torch.Tensor | None
    kind: str = ""


@dataclass
class Progress:
    """What a record of the run is made from: where it stands and what it has cost."""

    settings: Settings
    step: int
    runs: list[dict]
    seconds: float
    device: str
    config: dict
    parameters: int
    losses: dict[str, list[float]]

    def loss(self, kind: str = "", fallback: float | None = None) -> float | None:
        """The mean loss of the last 50 steps of ``kind``; ``fallback`` when there were none."""
        recent = self.losses.get(kind, [])[-50:]
        return float(np.mean(recent)) if recent else fallback


Draw = Callable[[int, torch.Generator, np.random.Generator], Batch]


def read_progress(out: Path) -> dict:
    """What ``out/training.json`` recorded, empty for a fresh folder."""
    path = out / PROGRESS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def already_trained(state: dict, steps: int, out: Path, log) -> bool:
    """Whether ``state`` has reached ``steps`` already, so that there is nothing to train."""
    if state.get("step", 0) < steps:
        return False
    log(f"{out} is already trained for {state['step']} steps; ask for more --steps")
    return True


def aggregator_for(
    unets: Sequence, names: list[str], config: dict, out: Path, state: dict, log
) -> Aggregator:
    """The aggregator saved in ``out`` when ``state`` says training began (refused for other
    experts), else a fresh one with ``config`` bound to these experts in this order."""
    if not state:
        try:
            return Aggregator.for_unets(unets, names, **config)
        except ValueError as e:
            raise RecipeError(f"aggregator: {e}") from None
    aggregator = Aggregator.from_pretrained(out)
    try:
        aggregator.check_experts(unets, names)
    except ValueError as e:
        raise RecipeError(f"--out: {e}; train into another folder") from None
    log(f"resuming at step {state['step']}")
    return aggregator


def draw_latents(
    mean: torch.Tensor, std: torch.Tensor, batch: int, gen: torch.Generator, scale: float,
    shift: float = 0.0,
) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """``batch`` picks among encoded images and a fresh draw from each one's VAE posterior,
    x₀ = (μ + σ·n − shift)·scale, with the picks' indices."""
    pick = torch.randint(len(mean), (batch,), generator=gen)
    z0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen) - shift) * scale
    return z0, pick.tolist()


def train(
    aggregator, unets: Sequence, scheduler, draw: Draw, settings: Settings, out: Path, *,
    accelerator, state: dict, record: Callable[[Progress], dict], card: Callable[[dict], str],
    log=print,
) -> dict:  # fmt: skip
    """Train ``aggregator`` from ``state``'s step to ``settings.steps`` on ``draw``'s batches,
    writing the aggregator, ``training.json`` (``record``) and ``README.md`` (``card``) to
    ``out`` every ``save_every`` steps and at the end; returns the last record."""
    device = accelerator.device
    aggregator.to(device).train()
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=settings.lr, weight_decay=0.0)
    aggregator, optimizer = accelerator.prepare(aggregator, optimizer)
    first = state.get("step", 0)
    gen = torch.Generator().manual_seed(settings.seed + first)
    rng = np.random.default_rng(settings.seed + first)
    losses: dict[str, list[float]] = {}
    start = time.time()

    def save(step: int) -> dict:
        model = accelerator.unwrap_model(aggregator)
        progress = Progress(
            settings=settings,
            step=step,
            runs=[*state.get("runs", []), {"from_step": first, "lr": settings.lr}],
            seconds=round(state.get("seconds", 0.0) + time.time() - start, 1),
            device=device_name(device),
            config={k: model.config[k] for k in ARCHITECTURE},
            parameters=sum(p.numel() for p in aggregator.parameters()),
            losses=losses,
        )
        written = record(progress)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        (out / PROGRESS_FILE).write_text(json.dumps(written, indent=2) + "\n")
        (out / "README.md").write_text(card(written))
        return written

    for step in range(first, settings.steps):
        batch = draw(step, gen, rng)
        loss = _loss(aggregator, unets, scheduler, batch, settings, gen, accelerator)
        if not torch.isfinite(loss):
            raise RecipeError(
                f"training diverged at step {step} (loss {loss.item()}); lower --lr "
                "(the last good aggregator is in --out)"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        losses.setdefault(batch.kind, []).append(loss.item())
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            rate = (time.time() - start) / (done - first)
            log(f"step {done}/{settings.steps} loss {_recent(losses)} ({rate:.2f} s/step)")
        if done % settings.save_every == 0 and done < settings.steps:
            save(done)
    return save(settings.steps)


def _loss(aggregator, unets, scheduler, batch: Batch, settings: Settings, gen,
          accelerator) -> torch.Tensor:  # fmt: skip
    """The denoising loss of one batch at fresh noise (plus offset noise) and timesteps."""
    z0, device = batch.latents, accelerator.device
    noise = torch.randn(z0.shape, generator=gen)
    if settings.offset_noise:
        noise += settings.offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
    with accelerator.autocast():
        return training.denoising_loss(
            aggregator, unets, scheduler, z0.to(device), noise.to(device), t.to(device),
            batch.texts, min_snr_gamma=settings.min_snr_gamma, added_cond_kwargs=batch.added,
            aggregator_text=batch.whole,
        )  # fmt: skip


def _recent(losses: dict[str, list[float]]) -> str:
    """The mean of each kind's last 25 losses: ``0.1234``, or ``one-object 0.12 scenes 0.34``."""
    return " ".join(f"{kind} {np.mean(v[-25:]):.4f}".lstrip() for kind, v in sorted(losses.items()))
