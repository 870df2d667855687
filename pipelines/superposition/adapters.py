"""LoRA adapters per expert: exactly the adapters an expert names are active, at its strengths,
while its prompt is encoded and its U-Net runs, so that two LoRA variants of one model are two
experts on one U-Net (``[(0, "a circle", {"purple": 1.0}), (0, "a star", {"star": 1.0})]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)

Adapters = tuple[tuple[str, float], ...] | None
"""Loaded adapter names and strengths, in order: ``()`` for none, ``None`` to leave them as
they are."""


def _with_lora(text_encoders: Sequence[torch.nn.Module | None]) -> list[torch.nn.Module]:
    return [te for te in text_encoders if te is not None and getattr(te, "peft_config", None)]


def check_adapters(
    adapters: tuple[tuple[str, float], ...],
    unet: UNet2DConditionModel,
    text_encoders: Sequence[torch.nn.Module | None],
) -> None:
    """Refuse adapters loaded on neither ``unet`` nor the text encoders, naming what is loaded."""
    known = set(getattr(unet, "peft_config", None) or {})
    for te in _with_lora(text_encoders):
        known |= set(te.peft_config)
    missing = [name for name, _ in adapters if name not in known]
    if missing:
        raise ValueError(
            f"adapters {missing} are not loaded on this expert's U-Net or text encoders "
            f"(loaded: {sorted(known) or 'none'}); load them with load_lora_weights first"
        )


def activate(
    adapters: Adapters,
    unet: UNet2DConditionModel,
    text_encoders: Sequence[torch.nn.Module | None],
) -> None:
    """Make exactly ``adapters`` active on ``unet`` and the text encoders (``None``: leave them
    as they are). The last expert group's adapters stay active after a call."""
    if adapters is None:
        return
    if getattr(unet, "peft_config", None):
        mine = [(n, w) for n, w in adapters if n in unet.peft_config]
        if mine:
            unet.enable_adapters()
            unet.set_adapters([n for n, _ in mine], [w for _, w in mine])
        else:
            unet.disable_adapters()
    for te in _with_lora(text_encoders):
        mine = [(n, w) for n, w in adapters if n in te.peft_config]
        if mine:
            enable_lora_for_text_encoder(te)
            set_adapters_for_text_encoder([n for n, _ in mine], te, [w for _, w in mine])
        else:
            disable_lora_for_text_encoder(te)
