"""The live merge: the experts' cached U-Nets merged on their device into one scratch U-Net.

The sources are the U-Nets the model cache already holds (on the GPU when there is one), so
changing a merge parameter and generating again reads nothing from disk; they are only read,
never written. The result goes into a scratch ``UNet2DConditionModel`` built once per
architecture, device and dtype and reused; a request holds its slot's lock from the merge to the
last sampling step, so two requests with different merges never see each other's weights, and a
request whose merge equals the slot's current one skips the computation.

An expert's LoRAs are baked into its U-Net weights as each tensor is merged (``lora.baked``, the
same per-tensor function the export uses), from LoRA files read once and kept
(``lora.read_lora_cached``); the cached U-Nets stay as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from composer.merge import lora
from composer.merge.blocks import weight_map
from composer.merge.plan import check_compatible, merge_tensor, whole_model_thresholds
from composer.recipe import Merge, RecipeError


def base_weights(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The U-Net's own parameters by diffusers name, without any loaded LoRA adapters (PEFT keeps
    the original weight as ``….base_layer.weight`` and adds ``lora_A``/``lora_B``)."""
    out = {}
    for name, tensor in unet.state_dict().items():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


@dataclass
class _Slot:
    unet: UNet2DConditionModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: object = None


_SLOTS: dict[tuple, _Slot] = {}
_SLOTS_LOCK = threading.Lock()
MAX_SLOTS = 1
"""Scratch U-Nets kept (one per architecture/device/dtype; the oldest is dropped beyond this)."""


def _slot(config: dict, device: torch.device, dtype: torch.dtype) -> _Slot:
    key = (repr(sorted((k, repr(v)) for k, v in config.items())), str(device), str(dtype))
    with _SLOTS_LOCK:
        slot = _SLOTS.get(key)
        if slot is None:
            while len(_SLOTS) >= MAX_SLOTS:
                _SLOTS.pop(next(iter(_SLOTS)))
            unet = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval()
            slot = _SLOTS[key] = _Slot(unet.requires_grad_(False))
        return slot


@dataclass
class LiveMerge:
    unet: UNet2DConditionModel
    seconds: float
    """Time spent merging (0 when the slot already held this merge)."""


@contextmanager
def merged_unet(
    settings: Merge,
    experts: Sequence[tuple[str, UNet2DConditionModel, float]],
    base: tuple[str, UNet2DConditionModel] | None,
    loras: Sequence[Sequence[tuple[str, str, float]]] = (),
) -> Iterator[LiveMerge]:
    """Hold a scratch U-Net holding the merge of ``experts`` ((name, U-Net, weight)) over
    ``base`` ((name, U-Net) or None) for the duration of the ``with`` block. ``loras[i]`` are
    expert i's LoRAs ((recipe field, file, strength)), baked into its U-Net weights; their
    text-encoder layers are not this function's business (the caller's pipeline applies them)."""
    first = experts[0][1]
    sources = [(name, base_weights(unet)) for name, unet, _ in experts]
    base_sd = base_weights(base[1]) if base else None
    check_compatible(
        [(n, {k: tuple(v.shape) for k, v in sd.items()}) for n, sd in sources]
        + ([(base[0], {k: tuple(v.shape) for k, v in base_sd.items()})] if base else [])
    )
    loras = list(loras) or [()] * len(experts)
    layers = [
        lora.bake_plan(
            files, {"unet." + k: tuple(v.shape) for k, v in sd.items()}, name, lora.TEXT_ENCODERS
        )
        for (name, sd), files in zip(sources, loras, strict=True)
    ]
    try:
        block_weight = weight_map(first.config, settings.block_weights, settings.overrides)
    except ValueError as e:
        raise RecipeError(f"merge.block_weights: {e}") from None
    slot = _slot(dict(first.config), first.device, first.dtype)
    key = (
        settings,
        tuple((id(unet), w) for _, unet, w in experts),
        tuple(tuple((path, s) for _, path, s in files) for files in loras),
        id(base[1]) if base else None,
    )
    with slot.lock:
        seconds = 0.0
        if slot.key != key:
            start = time.perf_counter()
            slot.key = None  # a merge that fails half-way must not be taken for a finished one
            _fill(
                slot.unet,
                settings,
                sources,
                layers,
                [w for _, _, w in experts],
                base_sd,
                block_weight,
            )
            if first.device.type == "cuda":
                torch.cuda.synchronize(first.device)
            seconds = time.perf_counter() - start
            slot.key = key
        yield LiveMerge(slot.unet, seconds)


@torch.no_grad()
def _fill(target, settings, sources, layers, weights, base_sd, block_weight) -> None:
    names = list(sources[0][1])
    experts = [sd for _, sd in sources]

    def expert(i: int, name: str) -> torch.Tensor:
        return lora.baked(experts[i][name], layers[i].get("unet." + name, ()))

    thresholds = None
    if settings.method in ("ties", "consensus") and settings.trim_scope == "model":
        thresholds = whole_model_thresholds(
            names,
            lambda n, i: expert(i, n) - base_sd[n].float(),
            len(experts),
            settings.density,
        )
    out = target.state_dict()
    for name in names:
        value = merge_tensor(
            settings,
            name,
            base_sd[name].float() if base_sd is not None else None,
            [expert(i, name) for i in range(len(experts))],
            weights,
            block_weight(name),
            thresholds,
        )
        out[name].copy_(value.to(out[name].dtype))
