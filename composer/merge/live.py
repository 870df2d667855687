"""The live merge: the experts' cached U-Nets and text encoders merged on their device into one
scratch model.

The sources are the modules the model cache already holds (on the GPU when there is one), so
changing a merge parameter and generating again reads nothing from disk; they are only read,
never written. The result goes into scratch modules (a U-Net and the text encoder(s), as
AUTOMATIC1111's checkpoint merger and supermerger merge the whole checkpoint) built once per
architecture, device and dtype and reused; a request holds its slot's lock from the merge to the
last sampling step, so two requests with different merges never see each other's weights, and a
request whose merge equals the slot's current one skips the computation.

An expert's LoRAs are baked into its weights (U-Net and text encoders) as each tensor is merged
(``lora.baked``, the same per-tensor function the export uses), from LoRA files read once and
kept (``checkpoints.lora_files.read_lora_cached``); the cached modules stay as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import ModelMixin

from composer.checkpoints.names import lora_name, merge_name
from composer.merge import lora
from composer.merge.blocks import weight_map
from composer.merge.plan import (
    COMPONENTS,
    check_compatible,
    merge_parameter,
    trims_whole_model,
    whole_model_thresholds,
)
from composer.merge.registry import Merge, MergeError

Modules = Mapping[str, torch.nn.Module]
"""A model's merged components by pipeline attribute: ``unet``, ``text_encoder``(, ``_2``)."""


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters by name, without any loaded LoRA adapters (PEFT keeps the
    original weight as ``….base_layer.weight`` and adds ``lora_A``/``lora_B``)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


@dataclass
class _Slot:
    modules: dict[str, torch.nn.Module]
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: object = None


_SLOTS: dict[tuple, _Slot] = {}
_SLOTS_LOCK = threading.Lock()
MAX_SLOTS = 1
"""Scratch models kept (one per architecture/device/dtype; the oldest is dropped beyond this)."""


def _empty_like(module: torch.nn.Module) -> torch.nn.Module:
    """A new module of ``module``'s class and config (diffusers or transformers), same place."""
    if isinstance(module, ModelMixin):
        new = type(module).from_config(module.config)
    else:
        new = type(module)(module.config)
    return new.to(device=module.device, dtype=module.dtype).eval().requires_grad_(False)


def _architecture(module: torch.nn.Module) -> str:
    """What a scratch module is built from: its class and config, less the bookkeeping entries
    (``_name_or_path``, versions, the saved dtype) that differ between models of one
    architecture."""
    config = dict(module.config) if isinstance(module, ModelMixin) else module.config.to_dict()
    bookkeeping = {"transformers_version", "dtype", "torch_dtype"}
    kept = sorted(
        (k, repr(v)) for k, v in config.items() if not k.startswith("_") and k not in bookkeeping
    )
    return f"{type(module).__name__}{kept}"


def _slot(first: Modules) -> _Slot:
    key = tuple((c, _architecture(m), str(m.device), str(m.dtype)) for c, m in first.items())
    with _SLOTS_LOCK:
        slot = _SLOTS.get(key)
        if slot is None:
            while len(_SLOTS) >= MAX_SLOTS:
                _SLOTS.pop(next(iter(_SLOTS)))
            slot = _SLOTS[key] = _Slot({c: _empty_like(m) for c, m in first.items()})
        return slot


@dataclass
class LiveMerge:
    modules: dict[str, torch.nn.Module]
    """The merged components, by pipeline attribute (``unet``, ``text_encoder``…)."""
    seconds: float
    """Time spent merging (0 when the slot already held this merge)."""


@contextmanager
def merged_model(
    settings: Merge,
    experts: Sequence[tuple[str, Modules, float]],
    base: tuple[str, Modules] | None,
    loras: Sequence[Sequence[tuple[str, str, float]]] = (),
    fishers: Sequence[tuple[str, dict[str, torch.Tensor]]] | None = None,
) -> Iterator[LiveMerge]:
    """Hold scratch modules holding the merge of ``experts`` ((name, components, weight)) over
    ``base`` ((name, components) or None) for the duration of the ``with`` block. The components
    merged are the first expert's (``COMPONENTS`` order, U-Net first); every other model must
    have them with the same parameters. ``loras[i]`` are expert i's LoRAs ((recipe field, file,
    strength)), baked into its U-Net and text-encoder weights. ``fishers[i]`` is expert i's
    U-Net Fisher estimate as (its cache key, parameter name → tensor), for ``fisher``. A merge
    that cannot be done raises ``MergeError``."""
    first = {c: experts[0][1][c] for c in COMPONENTS if experts[0][1].get(c) is not None}
    models = [(name, mods) for name, mods, _ in experts] + ([base] if base else [])
    for name, mods in models:
        missing = [c for c in first if mods.get(c) is None]
        if missing:
            raise MergeError(
                f"experts: {experts[0][0]!r} and {name!r} cannot be merged: {name!r} has no "
                f"{missing[0]}"
            )
    weights = {c: [(n, base_weights(mods[c])) for n, mods in models] for c in first}
    for c, state in weights.items():
        check_compatible([(n, {k: tuple(v.shape) for k, v in sd.items()}) for n, sd in state], c)
    sources = [{c: weights[c][i][1] for c in first} for i in range(len(experts))]
    base_sd = {c: weights[c][-1][1] for c in first} if base else None
    loras = list(loras) or [()] * len(experts)
    layers = [
        lora.bake_plan(
            files,
            {lora_name(c, k): tuple(v.shape) for c, sd in sd_by_c.items() for k, v in sd.items()},
            name,
            dict(mods["unet"].config),
        )
        for (name, mods, _), sd_by_c, files in zip(experts, sources, loras, strict=True)
    ]
    try:
        block_weight = weight_map(first["unet"].config, settings.block_weights, settings.overrides)
    except ValueError as e:
        raise MergeError(f"merge.block_weights: {e}") from None
    slot = _slot(first)
    key = (
        settings,
        tuple((tuple(id(mods[c]) for c in first), w) for _, mods, w in experts),
        tuple(tuple((path, s) for _, path, s in files) for files in loras),
        tuple(id(base[1][c]) for c in first) if base else None,
        tuple(k for k, _ in fishers) if fishers else None,
    )
    with slot.lock:
        seconds = 0.0
        if slot.key != key:
            start = time.perf_counter()
            slot.key = None  # a merge that fails half-way must not be taken for a finished one
            for c, target in slot.modules.items():
                _fill(
                    c,
                    target,
                    settings,
                    [sd[c] for sd in sources],
                    layers,
                    [w for _, _, w in experts],
                    base_sd[c] if base_sd else None,
                    block_weight,
                    [f for _, f in fishers] if fishers and c == "unet" else None,
                )
            device = first["unet"].device
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            slot.key = key
        yield LiveMerge(dict(slot.modules), seconds)


@torch.no_grad()
def _fill(
    component, target, settings, experts, layers, weights, base_sd, block_weight, fishers=None
) -> None:
    keys = list(experts[0])

    def expert(i: int, key: str) -> torch.Tensor:
        value = experts[i][key]
        return lora.baked(value, layers[i].get(lora_name(component, key), ()))

    thresholds = None
    if trims_whole_model(settings):
        floats = [k for k in keys if experts[0][k].is_floating_point()]
        thresholds = whole_model_thresholds(
            floats,
            lambda k, i: expert(i, k) - base_sd[k].float(),
            len(experts),
            settings.density,
        )
    out = target.state_dict()
    for key in keys:
        name = merge_name(component, key)
        value = merge_parameter(
            settings,
            name,
            base_sd[key] if base_sd is not None else None,
            [experts[i][key] if not experts[i][key].is_floating_point() else expert(i, key)
             for i in range(len(experts))],
            weights,
            block_weight(name),
            thresholds,
            shortcut=component != "unet",
            fishers=[f[key] for f in fishers] if fishers else None,
        )  # fmt: skip
        out[key].copy_(value.to(out[key].dtype))
