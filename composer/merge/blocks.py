r"""Block names for per-block merge weights, as supermerger and A1111 block-merging name them.

Stable Diffusion's original U-Net is a list of ``input_blocks`` (IN), a ``middle_block`` (M) and
``output_blocks`` (OUT); diffusers regroups the same layers into ``down_blocks``/``up_blocks``.
For a diffusers U-Net with D down blocks of L layers each:

- IN00 is ``conv_in``; down block i's layer j (its resnet and, if any, its attention) is
  IN(1 + i(L+1) + j) and its downsampler IN(1 + i(L+1) + L) (the last down block has none);
- M00 is ``mid_block``;
- up block i has L+1 layers: layer j is OUT(i(L+1) + j), its upsampler belongs to its last layer;
- ``conv_norm_out``/``conv_out`` belong to the last OUT block (the original's ``out.``);
- BASE is everything else: time and added embeddings, and the text encoder(s).

SD 1.x/2.x (D = 4, L = 2): BASE, IN00–IN11, M00, OUT00–OUT11 (26 weights).
SDXL (D = 3, L = 2): BASE, IN00–IN08, M00, OUT00–OUT08 (20 weights).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")


def block_names(n_down: int, layers: int) -> list[str]:
    """The block names in order for a U-Net with ``n_down`` down blocks of ``layers`` layers."""
    n_in = n_down * (layers + 1)
    return ["BASE", *(f"IN{i:02d}" for i in range(n_in)), "M00"] + [
        f"OUT{i:02d}" for i in range(n_in)
    ]


def names_for_config(config: dict) -> list[str]:
    return block_names(len(config["down_block_types"]), _layers(config))


def _layers(config: dict) -> int:
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, Sequence):
        if len(set(layers)) != 1:
            raise ValueError("block weights need the same layers_per_block in every block")
        layers = layers[0]
    return int(layers)


def block_of(name: str, n_down: int, layers: int) -> str:
    """The block name of U-Net parameter ``name`` (diffusers naming, without a ``unet.`` prefix)."""
    if name.startswith("conv_in."):
        return "IN00"
    if name.startswith("mid_block."):
        return "M00"
    if name.startswith(("conv_norm_out.", "conv_out.")):
        return f"OUT{n_down * (layers + 1) - 1:02d}"
    match = _DOWN.match(name)
    if match:
        i, kind, j = int(match[1]), match[2], int(match[3])
        index = 1 + i * (layers + 1) + (layers if kind == "downsamplers" else j)
        return f"IN{index:02d}"
    match = _UP.match(name)
    if match:
        i, kind, j = int(match[1]), match[2], int(match[3])
        index = i * (layers + 1) + (layers if kind == "upsamplers" else j)
        return f"OUT{index:02d}"
    return "BASE"


def weight_map(
    config: dict,
    block_weights: Sequence[float] | None,
    overrides: Sequence[tuple[str, float]] = (),
):
    """``weight(name) -> float``: the block weight of a parameter, then the last per-parameter
    regex override that matches its name (``re.search``). Without block weights every block is 1.
    Raises ValueError when the number of block weights does not fit this U-Net."""
    names = names_for_config(config)
    if block_weights is not None and len(block_weights) != len(names):
        raise ValueError(
            f"block_weights has {len(block_weights)} values; this U-Net has {len(names)} blocks "
            f"({names[0]}, {names[1]}…{names[-1]})"
        )
    table = dict(zip(names, block_weights, strict=True)) if block_weights is not None else {}
    n_down, layers = len(config["down_block_types"]), _layers(config)
    patterns = [(re.compile(p), float(w)) for p, w in overrides]

    def weight(name: str) -> float:
        value = table.get(block_of(name, n_down, layers), 1.0)
        for pattern, w in patterns:
            if pattern.search(name):
                value = w
        return value

    return weight
