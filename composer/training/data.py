"""The users' training data: a kohya-style folder of images with captions beside them, in
aspect-ratio buckets, as batches for the aggregator's training loop (``aggregator.train``).

Captions: ``NAME.txt`` beside ``NAME.png`` (the layout of kohya's trainers and A1111's
captioning); optionally ``NAME.1.txt``, ``NAME.2.txt``, … give expert 1, 2, … its own caption.
Buckets: as kohya's trainers do, each image goes to the bucket (a width × height in multiples of
the model's size step, of at most size² pixels, sides at most 4:1) nearest its aspect ratio, is
resized to cover it and centre-cropped by what is left over, and each step's batch is drawn from
one bucket (chosen in proportion to its images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from composer.recipe import RecipeError
from composer.training.aggregator import Batch, draw_latents

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_ASPECT = 4  # kohya's default buckets at 512 run from 256×1024 to 1024×256
EXIF_ORIENTATION = 0x0112


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


@torch.no_grad()
def encode_images(
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


class BucketBatches:
    """Batches of a captioned folder, each from one bucket: x₀ drawn from the images' encoded
    posteriors, ``caption_drop`` of the captions replaced by the empty prompt (so classifier-free
    guidance keeps working), encoded by the ensemble's text encoders (``encode_captions``)."""

    def __init__(self, ensemble, paths: list[Path], sizes: list[tuple[int, int]],
                 captions: list[str], parts: list[list[str]], size: int, step: int, batch: int,
                 caption_drop: float, device) -> None:  # fmt: skip
        choices = buckets(size, step)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, (width, height) in enumerate(sizes):
            self.groups.setdefault(nearest_bucket(width, height, choices), []).append(i)
        self.shapes = sorted(self.groups, key=lambda b: (-len(self.groups[b]), b))
        self.share = np.array([len(self.groups[b]) for b in self.shapes]) / len(paths)
        self.latents = {
            b: encode_images(ensemble.vae, [paths[i] for i in self.groups[b]], *b, device)
            for b in self.shapes
        }
        self.ensemble, self.captions, self.parts = ensemble, captions, parts
        self.batch, self.caption_drop = batch, caption_drop
        pairs = zip(captions, parts, strict=True)
        self.with_parts = sum(any(p != c for p in ps) for c, ps in pairs)
        self.scale = ensemble.vae.config.scaling_factor
        self.shift = ensemble.vae.config.get("shift_factor") or 0.0

    def counts(self) -> dict[str, int]:
        """Images per bucket, the most filled first: ``{"512×512": 40, "640×384": 12}``."""
        return {f"{w}×{h}": len(self.groups[w, h]) for w, h in self.shapes}

    def __call__(self, step: int, gen: torch.Generator, rng: np.random.Generator) -> Batch:
        bucket = self.shapes[rng.choice(len(self.shapes), p=self.share)]
        mean, std = self.latents[bucket]
        z0, pick = draw_latents(mean, std, self.batch, gen, self.scale, self.shift)
        idx = [self.groups[bucket][j] for j in pick]
        drop = [rng.random() < self.caption_drop for _ in idx]
        texts = ["" if d else self.captions[i] for d, i in zip(drop, idx, strict=True)]
        own = None
        if self.with_parts:
            own = [
                ["" if d else self.parts[i][k] for d, i in zip(drop, idx, strict=True)]
                for k in range(len(self.parts[0]))
            ]
        conds, added, whole = self.ensemble.encode_captions(texts, bucket[1], bucket[0], own)
        return Batch(z0, conds, added, whole)
