"""Train an AFA aggregator for your own experts: ``python -m composer aggregate train``.

    python -m composer aggregate train --experts MODEL MODEL [MODEL …] --data FOLDER \\
        --out FOLDER [--steps 2000] [--batch 4] [--lr 1e-4] [--size 512] …

``MODEL`` is anything a recipe accepts (bundled name, diffusers folder, single ``.safetensors``
file, Hub id); all experts must share one U-Net architecture and one latent space. ``FOLDER`` of
data holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) with their captions beside them in
``.txt`` files of the same name, the layout of kohya's trainers and A1111's captioning; an image
without a caption trains with the empty prompt (the count is printed). Images keep their aspect
ratio: as kohya's trainers do, each goes to the bucket (a width × height in multiples of the
model's size step, of at most ``--size``² pixels, sides at most 4:1) nearest its aspect ratio, is
resized to cover it and centre-cropped by what is left over, and each step's batch is drawn from
one bucket (chosen in proportion to its images). Square pictures train at ``--size``².

Per-expert captions (optional): ``NAME.1.txt``, ``NAME.2.txt``, … beside ``NAME.png`` give expert
1, 2, … (in ``--experts`` order) its own caption, its part of the picture, while ``NAME.txt``
describes the whole and is what the aggregators read, as a recipe's per-expert prompts do at
inference ("a red circle" and "a blue square" for the experts, "a red circle and a blue square"
for the aggregators). An expert without its file reads the whole caption.

What it does is Wang et al. 2025, §3.4: the experts stay frozen, one SABW aggregator per block
learns to make the blended noise prediction right (ε-MSE, or v-MSE for v-prediction experts),
AdamW, ``--caption-drop`` of the captions replaced by the empty prompt so classifier-free
guidance keeps working; accelerate puts it on the GPU when there is one. The output folder loads
with ``Aggregator.from_pretrained`` and names these experts (their fingerprints) in its config,
so it is refused for any others; put its path in a recipe's ``aggregate.aggregator``.

Every ``--save-every`` steps the folder gets the aggregator, ``training.json`` (the step reached
and the settings) and a ``README.md`` card. Running the same command again resumes from there;
asking for more ``--steps`` goes on training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from composer.recipe import RecipeError

COMMAND = "python -m composer aggregate train"
MAX_STEPS = 1_000_000
MAX_SIZE = 2048


def check(args: argparse.Namespace) -> None:
    """Refuse settings no run could use, before any model is loaded."""
    if not 1 <= args.steps <= MAX_STEPS:
        raise RecipeError(f"--steps: {args.steps} is not accepted; expected 1 … {MAX_STEPS}")
    if args.batch < 1 or args.lr <= 0 or not np.isfinite(args.lr):
        raise RecipeError(f"--batch {args.batch} / --lr {args.lr}: expected batch ≥ 1, lr > 0")
    if not 0 <= args.caption_drop < 1:
        raise RecipeError(f"--caption-drop: {args.caption_drop} is not in [0, 1)")
    if args.save_every < 1:
        raise RecipeError(f"--save-every: {args.save_every} is not accepted; expected ≥ 1")
    if len(args.experts) < 2:
        raise RecipeError("--experts: name at least two models to aggregate")


def load_experts(experts: list[str], device: torch.device):
    """The experts as one ``AggregationPipeline`` on ``device``, frozen, and their pipelines;
    refused when their latent spaces or U-Net architectures differ."""
    from composer import registry
    from pipelines.aggregation import AggregationPipeline

    sources = [registry.resolve_model(m, f"--experts[{i}]") for i, m in enumerate(experts)]
    pipes = [registry.load_pipeline(s, torch.device("cpu"), torch.float32) for s in sources]
    if len({registry.latent_signature(p) for p in pipes}) > 1:
        raise RecipeError(
            f"--experts: {experts[0]!r} and another expert have different latent spaces "
            "(VAE); aggregated experts must share one"
        )
    try:
        ensemble = AggregationPipeline.from_pipes(pipes, None, list(experts))
    except ValueError as e:
        raise RecipeError(f"--experts: {e}") from None
    ensemble.to(device)
    for unet in ensemble.unets:
        unet.requires_grad_(False).eval()
    for module in (ensemble.vae, ensemble.text_encoder, ensemble.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    return ensemble, pipes


def training_size(pipe, ensemble, size: int | None) -> tuple[int, int]:
    """The training side (``--size``, else the model's) and the size step images must be a
    multiple of: the VAE's factor × the U-Net's downsamplings."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    step = vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    size = size or pipe.unet.config.sample_size * ensemble.vae_scale_factor
    if not step <= size <= MAX_SIZE or size % step:
        raise RecipeError(
            f"--size: {size} is not accepted; expected a multiple of {step} up to {MAX_SIZE}"
        )
    return size, step


def train(args: argparse.Namespace, log=print) -> dict:
    """Train (or resume) the aggregator in ``args.out``; returns what ``training.json`` holds."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from composer.training import aggregator as loop
    from composer.training.data import BucketBatches, image_sizes, read_folder

    check(args)
    paths, captions, parts, missing = read_folder(Path(args.data), len(args.experts))
    sizes = image_sizes(paths)
    out = Path(args.out)
    state = loop.read_progress(out)
    if loop.already_trained(state, args.steps, out, log):
        return state

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    ensemble, pipes = load_experts(args.experts, accelerator.device)
    size, step = training_size(pipes[0], ensemble, args.size)
    config = {k: getattr(args, k) for k in loop.ARCHITECTURE}
    aggregator = loop.aggregator_for(ensemble.unets, list(args.experts), config, out, state, log)
    batches = BucketBatches(ensemble, paths, sizes, captions, parts, size, step, args.batch,
                            args.caption_drop, accelerator.device)  # fmt: skip
    described = ", ".join(f"{b} ({n})" for b, n in batches.counts().items())
    log(
        f"data: {len(paths)} images in buckets {described}, {missing} without a caption, "
        f"{batches.with_parts} with per-expert captions"
    )
    scheduler = DDPMScheduler.from_config(pipes[0].scheduler.config)
    data = {
        "data": str(Path(args.data).resolve()),
        "images": len(paths),
        "uncaptioned": missing,
        "with_expert_captions": batches.with_parts,
        "size": size,
        "buckets": batches.counts(),
    }
    settings = loop.Settings(args.steps, args.batch, args.lr, args.seed, args.save_every,
                             args.min_snr_gamma, args.offset_noise)  # fmt: skip

    def record(progress: loop.Progress) -> dict:
        return describe(progress, list(args.experts), data, args.caption_drop,
                        scheduler.config.prediction_type, state)  # fmt: skip

    return loop.train(aggregator, ensemble.unets, scheduler, batches, settings, out,
                      accelerator=accelerator, state=state, record=record, card=card,
                      log=log)  # fmt: skip


def describe(progress, experts: list[str], data: dict, caption_drop: float,
             prediction_type: str, state: dict) -> dict:  # fmt: skip
    """What ``training.json`` holds: the experts, the data, the settings and where it stands."""
    settings = progress.settings
    return {
        "experts": experts,
        "config": progress.config,
        "parameters": progress.parameters,
        **data,
        "step": progress.step,
        "steps": settings.steps,
        "batch": settings.batch,
        "runs": progress.runs,
        "caption_drop": caption_drop,
        "min_snr_gamma": settings.min_snr_gamma,
        "offset_noise": settings.offset_noise,
        "prediction_type": prediction_type,
        "seed": settings.seed,
        "seconds": progress.seconds,
        "device": progress.device,
        "loss": progress.loss(fallback=state.get("loss")),
    }


def card(record: dict) -> str:
    """The aggregator's README: experts, data, settings, time and device."""
    lrs = ", ".join(f"{r['lr']} from step {r['from_step']}" for r in record["runs"])
    lines = [
        "# AFA aggregator",
        "",
        "Spatial-Aware Block-Wise aggregators (Wang et al., ICLR 2025) for the experts below, in",
        f"this order, trained with `{COMMAND}`.",
        "",
        f"- Experts: {', '.join(record['experts'])}",
        f"- Data: {record['images']} images from {record['data']}, area {record['size']}², in "
        f"buckets {', '.join(f'{b} ({n})' for b, n in record['buckets'].items())} "
        f"({record['uncaptioned']} without a caption, "
        f"{record.get('with_expert_captions', 0)} with per-expert captions)",
        f"- Aggregator: {json.dumps(record['config'])}, {record['parameters']:,} parameters",
        f"- Steps: {record['step']} of {record['steps']}, batch {record['batch']}, AdamW lr {lrs}",
        f"- Loss: {record['prediction_type']} MSE, min-SNR-γ {record['min_snr_gamma'] or 'off'}, "
        f"offset noise {record['offset_noise']}, caption drop {record['caption_drop']}; "
        f"mean of the last 50 steps {record['loss']:.4f}",
        f"- Time: {record['seconds'] / 60:.1f} min on {record['device']}",
    ]
    if record["step"] < record["steps"]:
        lines.append(f"- Stopped at step {record['step']}; the same command resumes")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m composer aggregate",
        description="Train an AFA aggregator for your own experts.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or resume an aggregator", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t.add_argument("--experts", nargs="+", required=True, metavar="MODEL")
    t.add_argument("--data", required=True, help="folder of images with .txt captions")
    t.add_argument("--out", required=True, help="folder the aggregator is written to")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument(
        "--size", type=int, default=None,
        help="training side: buckets of at most SIZE² pixels (default: the model's)",
    )  # fmt: skip
    t.add_argument("--width", type=int, default=64, help="aggregator channels")
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--depth", type=int, default=1)
    t.add_argument("--groups", type=int, default=32, help="group-norm groups")
    t.add_argument(
        "--position-channels", type=int, default=0,
        help="x/y coordinate channels (0: the paper's aggregator; 2 lets it tell left from right)",
    )  # fmt: skip
    t.add_argument("--caption-drop", type=float, default=0.1)
    t.add_argument("--min-snr-gamma", type=float, default=None)
    t.add_argument("--offset-noise", type=float, default=0.0)
    t.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    t.add_argument("--save-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--allow-pickle", action="store_true", help="allow pickle (.ckpt) checkpoints")
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from composer import registry

    args = parser().parse_args(argv)
    if args.allow_pickle:
        os.environ["COMPOSER_ALLOW_PICKLE"] = "1"
    registry.quiet_libraries()
    try:
        record = train(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "step": record["step"], "loss": record.get("loss")}))
    return 0
