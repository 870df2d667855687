"""Superposition experts on the GPUs of one replica: which model goes on which of ``cuda:0``
… ``cuda:k-1`` when one GPU cannot hold them all, or a refusal that says what it would take.

A superposition step needs every expert's noise prediction for the same latents; what crosses
devices is the latents going out and the predictions coming back (a few hundred KiB at SD 1.5's
64×64×4, per image), never weights. Experts on one model share its U-Net (one batched call), so
the unit placed is a model, not an expert. AFA is not placed: its experts exchange features at
every block, which would cross devices 25 times a step, so it stays on one device.

The placement is worst-fit decreasing: the largest model first, each onto the device with the
most room left that fits it. That spreads the models over the replica's GPUs, which it holds
anyway, so their U-Net calls of one step run side by side; the fewest devices a recipe needs
(for the refusal's message) come from first-fit decreasing, which packs tightest.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from composer.recipe import Recipe, RecipeError

GiB = 2**30
HEADROOM = 1.25
"""A model's share of a device: its weights and a quarter more for one U-Net call's activations
and the VAE decode at SD 1.5's 512² (the speed benchmarks measured under 20 % in fp16)."""
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


class PlacementError(RecipeError):
    """The experts' models do not fit the replica's devices; the message says what would."""


@dataclass(frozen=True)
class Placement:
    device: Mapping[str, str]
    """Model → ``cuda:i``."""
    used: tuple[int, ...]
    """Bytes asked of each device, in device order."""


def place(needs: Mapping[str, int], budget: int, devices: int) -> Placement:
    """Put each model of ``needs`` (model → bytes) on one of ``devices`` devices of ``budget``
    bytes each, spreading them (worst-fit decreasing); ``PlacementError`` when they do not fit."""
    placed = _fit(needs, budget, devices, spread=True)
    if placed is not None:
        return placed
    sizes = ", ".join(f"{name} {_gib(size)}" for name, size in _largest_first(needs))
    too_big = [name for name, size in needs.items() if size > budget]
    if too_big:
        raise PlacementError(
            f"superpose: {', '.join(too_big)} needs more than one device's "
            f"{_gib(budget)} ({sizes}); give the replica GPUs with at least "
            f"{_gib(max(needs.values()))} each"
        )
    fewest = next(k for k in range(devices + 1, len(needs) + 1) if _fit(needs, budget, k))
    raise PlacementError(
        f"superpose: the experts' models need {_gib(sum(needs.values()))} ({sizes}) and do not "
        f"fit {devices} device(s) of {_gib(budget)}; they need {fewest}: serve with "
        f"--gpus-per-replica {fewest} (num_gpus: {fewest}), or use fewer experts"
    )


def _fit(needs: Mapping[str, int], budget: int, devices: int, spread: bool = False):
    used = [0] * devices
    device = {}
    for name, size in _largest_first(needs):
        fits = [i for i in range(devices) if used[i] + size <= budget]
        if not fits:
            return None
        i = min(fits, key=lambda d: (used[d], d)) if spread else fits[0]
        used[i] += size
        device[name] = f"cuda:{i}"
    return Placement(device, tuple(used))


def _largest_first(needs: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(needs.items(), key=lambda item: (-item[1], item[0]))


def _gib(size: int) -> str:
    return f"{size / GiB:.2f} GiB"


@functools.lru_cache(maxsize=64)
def weights_bytes(folder: str | Path, dtype_bytes: int = 2) -> int:
    """The bytes a diffusers folder's weights take at ``dtype_bytes`` per number (2: fp16), from
    the safetensors headers alone: a placement decides before anything is loaded. Remembered per
    folder: a multi-GPU process asks for every superposition request."""
    total = 0
    files = [
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)  # the zoo links shared parts
        for name in names
        if name.endswith(".safetensors")
    ]
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, tensor in header.items():
            if key != "__metadata__" and tensor["dtype"] in DTYPE_BYTES:
                floating = tensor["dtype"] in ("F64", "F32", "F16", "BF16")
                width = dtype_bytes if floating else DTYPE_BYTES[tensor["dtype"]]
                total += math.prod(tensor["shape"]) * width
    return total


def place_recipe(recipe: Recipe, budget: int, devices: int, dtype_bytes: int = 2) -> Placement:
    """Where ``recipe``'s models go on ``devices`` devices of ``budget`` bytes: each model (by
    reference) with its weights at ``dtype_bytes`` times ``HEADROOM``. Models that are not local
    folders (a single file, a Hub id) count their file's size."""
    from composer import registry

    needs = {}
    for i, expert in enumerate(recipe.experts):
        source = registry.resolve_model(expert.model, f"experts[{i}].model")
        location = Path(source.location)
        if location.is_dir():
            size = weights_bytes(location, dtype_bytes)
        elif location.is_file():
            size = location.stat().st_size
        else:
            raise PlacementError(
                f"experts[{i}].model: {expert.model!r} is not on this machine yet; its size is "
                "known once it is downloaded"
            )
        needs[expert.model] = math.ceil(size * HEADROOM)
    return place(needs, budget, devices)
