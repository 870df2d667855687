"""Pictures of AFA's aggregation maps: which expert the aggregator trusted where.

A map is (N, h, w): each expert's weight at every pixel of one aggregation point's features
(``engine.Result.maps``, averaged over the steps). Each expert gets a colour; a pixel's colour is
the weight-mixed colour of the experts, so with two experts red means "expert 1", blue "expert 2"
and purple "both alike". The map is upsampled to the image's size with nearest-neighbour, so the
feature grid stays visible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PALETTE = ((230, 60, 40), (40, 90, 230), (40, 170, 70), (230, 180, 30))
"""Expert 1 red, 2 blue, 3 green, 4 yellow."""


def map_image(weights: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """An RGB picture (width, height = ``size``) of a (N, h, w) weight map."""
    n = weights.shape[0]
    if n > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} experts can be coloured, not {n}")
    colours = torch.tensor(PALETTE[:n], dtype=torch.float32)  # (N, 3)
    rgb = torch.einsum("nhw,nc->hwc", weights.float().clamp(0, 1), colours)
    picture = Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy())
    return picture.resize(size, Image.Resampling.NEAREST)


def side_by_side(
    image: Image.Image, maps: dict[str, torch.Tensor], points: list[str]
) -> Image.Image:
    """The image, then the map of each of ``points``, with 2-pixel gaps: in one row, or in two
    when the image is wider than tall (a 64×32 picture and four maps in one row came out as a
    10:1 strip that the page shows a few pixels tall)."""
    tiles = [image.convert("RGB"), *(map_image(maps[p], image.size) for p in points)]
    columns = len(tiles) if image.width <= image.height else -(-len(tiles) // 2)
    rows = -(-len(tiles) // columns)
    grid = Image.new(
        "RGB",
        (columns * (image.width + 2) - 2, rows * (image.height + 2) - 2),
        (255, 255, 255),
    )
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * (image.width + 2), (k // columns) * (image.height + 2)))
    return grid


def expert_share(weights: torch.Tensor) -> list[float]:
    """Each expert's mean weight over the map: a one-line summary of who was trusted."""
    return [round(float(v), 3) for v in np.asarray(weights.float().mean(dim=(1, 2)))]
