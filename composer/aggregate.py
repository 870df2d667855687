"""Train an AFA aggregator for your own experts: ``python -m composer.aggregate train``.

    python -m composer.aggregate train --experts MODEL MODEL [MODEL …] --data FOLDER \\
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
import time
from pathlib import Path

import numpy as np
import torch

from composer.recipe import RecipeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_STEPS = 1_000_000
MAX_SIZE = 2048
MAX_ASPECT = 4  # kohya's default buckets at 512 run from 256×1024 to 1024×256
EXIF_ORIENTATION = 0x0112
ARCHITECTURE = ("width", "heads", "depth", "groups", "position_channels")


def _read_caption(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def read_folder(
    folder: Path, experts: int = 2
) -> tuple[list[Path], list[str], list[list[str]], int]:
    """The images of ``folder`` (sorted by name), their captions, per image each of the
    ``experts`` experts' own caption (``NAME.k.txt``, else the image's caption), and how many
    images had no caption."""
    if not folder.is_dir():
        raise RecipeError(f"--data: {str(folder)!r} is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise RecipeError(f"--data: {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = {p.name for p in folder.iterdir() if p.suffix == ".txt" and p.is_file()}
    stems = {image.stem for image in images}
    for name in sorted(names):
        stem, _, number = name[: -len(".txt")].rpartition(".")
        if stem in stems and number.isdigit() and not 1 <= int(number) <= experts:
            raise RecipeError(
                f"--data: {name} is a caption for expert {int(number)}, but there are "
                f"{experts} experts (NAME.1.txt … NAME.{experts}.txt)"
            )
    captions, parts, missing = [], [], 0
    for image in images:
        text = image.with_suffix(".txt")
        captions.append(_read_caption(text) if text.name in names else "")
        missing += text.name not in names
        parts.append(
            [
                _read_caption(folder / own) if own in names else captions[-1]
                for own in (f"{image.stem}.{k}.txt" for k in range(1, experts + 1))
            ]
        )
    return images, captions, parts, missing


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """Each image's (width, height) as shown (EXIF rotation applied), read from its header."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # turned 90°
                    width, height = height, width
        except (UnidentifiedImageError, OSError) as e:
            raise RecipeError(f"--data: {path.name} is not a readable image ({e})") from None
        sizes.append((width, height))
    return sizes


def buckets(size: int, step: int) -> list[tuple[int, int]]:
    """The (width, height) buckets for training at ``size``² pixels: for every side that is a
    multiple of ``step``, the longest other side in multiples of ``step`` that keeps the area at
    most ``size``², kept when the sides are at most ``MAX_ASPECT``:1 (kohya's enumeration)."""
    found = set()
    for side in range(step, size * MAX_ASPECT + 1, step):
        other = size * size // side // step * step
        if other >= step and max(side, other) <= MAX_ASPECT * min(side, other):
            found |= {(side, other), (other, side)}
    return sorted(found)


def nearest_bucket(width: int, height: int, choices: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) the image's; the larger on a tie."""
    aspect = np.log(width / height)
    return min(choices, key=lambda b: (round(abs(np.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def load_pixels(paths: list[Path], width: int, height: int) -> torch.Tensor:
    """Images → (N, 3, height, width) in [-1, 1]: resized to cover width × height, centre crop."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image).convert("RGB")
                out[i] = np.asarray(ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS))
        except (UnidentifiedImageError, OSError) as e:
            raise RecipeError(f"--data: {path.name} is not a readable image ({e})") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _size_step(pipe) -> int:
    """Image sizes must be multiples of this: the VAE's factor × the U-Net's downsamplings."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def train(args: argparse.Namespace, log=print) -> dict:
    """Train (or resume) the aggregator in ``args.out``; returns what ``training.json`` holds."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from composer import registry
    from pipelines.aggregation import AggregationPipeline, Aggregator
    from pipelines.aggregation.training import denoising_loss

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
    paths, captions, parts, missing = read_folder(Path(args.data), len(args.experts))
    sizes = image_sizes(paths)
    with_parts = sum(any(p != c for p in ps) for c, ps in zip(captions, parts, strict=True))
    out = Path(args.out)
    progress_file = out / "training.json"
    state = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if state.get("step", 0) >= args.steps:
        log(f"{out} is already trained for {state['step']} steps; ask for more --steps")
        return state

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    torch.manual_seed(args.seed)
    sources = [registry.resolve_model(m, f"--experts[{i}]") for i, m in enumerate(args.experts)]
    pipes = [registry.load_pipeline(s, torch.device("cpu"), torch.float32) for s in sources]
    if len({registry.latent_signature(p) for p in pipes}) > 1:
        raise RecipeError(
            f"--experts: {args.experts[0]!r} and another expert have different latent spaces "
            "(VAE); aggregated experts must share one"
        )
    names = list(args.experts)
    try:
        ensemble = AggregationPipeline.from_pipes(pipes, None, names)
    except ValueError as e:
        raise RecipeError(f"--experts: {e}") from None
    ensemble.to(device)
    unets = ensemble.unets
    for unet in unets:
        unet.requires_grad_(False).eval()
    for module in (ensemble.vae, ensemble.text_encoder, ensemble.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)

    step_size = _size_step(pipes[0])
    size = args.size or pipes[0].unet.config.sample_size * ensemble.vae_scale_factor
    if not step_size <= size <= MAX_SIZE or size % step_size:
        raise RecipeError(
            f"--size: {size} is not accepted; expected a multiple of {step_size} up to {MAX_SIZE}"
        )

    if state:
        aggregator = Aggregator.from_pretrained(out)
        try:
            aggregator.check_experts(unets, names)
        except ValueError as e:
            raise RecipeError(f"--out: {e}; train into another folder") from None
        log(f"resuming at step {state['step']}")
    else:
        config = {
            "width": args.width,
            "heads": args.heads,
            "depth": args.depth,
            "groups": args.groups,
            "position_channels": args.position_channels,
        }
        try:
            aggregator = Aggregator.for_unets(unets, names, **config)
        except ValueError as e:
            raise RecipeError(f"aggregator: {e}") from None
    aggregator.to(device).train()

    choices = buckets(size, step_size)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (width, height) in enumerate(sizes):
        groups.setdefault(nearest_bucket(width, height, choices), []).append(i)
    shapes = sorted(groups, key=lambda b: (-len(groups[b]), b))
    share = np.array([len(groups[b]) for b in shapes]) / len(paths)
    latents = {b: _encode_images(ensemble.vae, [paths[i] for i in groups[b]], *b, device)
               for b in shapes}  # fmt: skip
    scale = ensemble.vae.config.scaling_factor
    shift = ensemble.vae.config.get("shift_factor") or 0.0
    described = ", ".join(f"{w}×{h} ({len(groups[w, h])})" for w, h in shapes)
    log(
        f"data: {len(paths)} images in buckets {described}, {missing} without a caption, "
        f"{with_parts} with per-expert captions"
    )

    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=args.lr, weight_decay=0.0)
    aggregator, optimizer = accelerator.prepare(aggregator, optimizer)
    scheduler = DDPMScheduler.from_config(pipes[0].scheduler.config)
    first = state.get("step", 0)
    gen = torch.Generator().manual_seed(args.seed + first)
    rng = np.random.default_rng(args.seed + first)
    losses: list[float] = []
    start, before = time.time(), state.get("seconds", 0.0)
    step = first

    def save() -> dict:
        record = {
            "experts": names,
            "config": {k: accelerator.unwrap_model(aggregator).config[k] for k in ARCHITECTURE},
            "parameters": sum(p.numel() for p in aggregator.parameters()),
            "data": str(Path(args.data).resolve()),
            "images": len(paths),
            "uncaptioned": missing,
            "with_expert_captions": with_parts,
            "size": size,
            "buckets": {f"{w}×{h}": len(groups[w, h]) for w, h in shapes},
            "step": step,
            "steps": args.steps,
            "batch": args.batch,
            "runs": [*state.get("runs", []), {"from_step": first, "lr": args.lr}],
            "caption_drop": args.caption_drop,
            "min_snr_gamma": args.min_snr_gamma,
            "offset_noise": args.offset_noise,
            "prediction_type": scheduler.config.prediction_type,
            "seed": args.seed,
            "seconds": round(before + time.time() - start, 1),
            "device": _describe(device),
            "loss": float(np.mean(losses[-50:])) if losses else state.get("loss"),
        }
        out.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(aggregator).save_pretrained(out)
        progress_file.write_text(json.dumps(record, indent=2) + "\n")
        (out / "README.md").write_text(card(record))
        return record

    while step < args.steps:
        bucket = shapes[rng.choice(len(shapes), p=share)]
        mean, std = latents[bucket]
        pick = torch.randint(len(mean), (args.batch,), generator=gen)
        z0 = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen) - shift) * scale
        idx = [groups[bucket][j] for j in pick.tolist()]
        drop = [rng.random() < args.caption_drop for _ in idx]
        texts = ["" if d else captions[i] for d, i in zip(drop, idx, strict=True)]
        own = None
        if with_parts:
            own = [
                ["" if d else parts[i][k] for d, i in zip(drop, idx, strict=True)]
                for k in range(len(names))
            ]
        conds, added, whole = ensemble.encode_captions(texts, bucket[1], bucket[0], own)
        noise = torch.randn(z0.shape, generator=gen)
        if args.offset_noise:
            noise += args.offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        with accelerator.autocast():
            loss = denoising_loss(
                aggregator, unets, scheduler, z0.to(device), noise.to(device), t.to(device),
                conds, min_snr_gamma=args.min_snr_gamma, added_cond_kwargs=added,
                aggregator_text=whole,
            )  # fmt: skip
        if not torch.isfinite(loss):
            raise RecipeError(
                f"training diverged at step {step} (loss {loss.item()}); lower --lr "
                "(the last good aggregator is in --out)"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0 or step == args.steps:
            rate = (time.time() - start) / (step - first)
            log(f"step {step}/{args.steps} loss {np.mean(losses[-25:]):.4f} ({rate:.2f} s/step)")
        if step % args.save_every == 0 or step == args.steps:
            save()
    return save()


@torch.no_grad()
def _encode_images(
    vae, paths: list[Path], width: int, height: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of every image (a latent is drawn afresh each step), on
    the CPU; images are read 8 at a time, so only latents are held (1000 images at 512² take
    130 MB, their pixels would take 3 GB)."""
    means, stds = [], []
    for start in range(0, len(paths), 8):
        chunk = load_pixels(paths[start : start + 8], width, height)
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def card(record: dict) -> str:
    """The aggregator's README: experts, data, settings, time and device."""
    lrs = ", ".join(f"{r['lr']} from step {r['from_step']}" for r in record["runs"])
    lines = [
        "# AFA aggregator",
        "",
        "Spatial-Aware Block-Wise aggregators (Wang et al., ICLR 2025) for the experts below, in",
        "this order, trained with `python -m composer.aggregate train`.",
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
        prog="python -m composer.aggregate",
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


if __name__ == "__main__":
    raise SystemExit(main())
