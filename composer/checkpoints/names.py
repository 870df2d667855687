"""One name per weight, however the model was read: from loaded modules, diffusers folders,
single files or LoRA files.

A merge addresses parameters by these names (block weights, per-parameter overrides, DARE's mask
seeds) and a LoRA's layers are placed on weights by them, so the same weight must be spelt the
same way from every source: U-Net parameters by their diffusers name, text-encoder parameters as
``text_encoder.text_model.…`` (``ldm_format.clip_inner``, the same for every transformers version
and file layout).
"""

from __future__ import annotations

from composer.checkpoints.ldm_format import clip_inner

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def merge_name(component: str, key: str) -> str:
    """The name a parameter ``key`` of ``component`` (a pipeline attribute) is merged under."""
    return key if component == "unet" else f"{component}.{clip_inner(key)}"


def lora_name(component: str, key: str) -> str:
    """The name of a parameter as a bake plan (``merge.lora.Layers``) keys it: ``unet.<name>``
    for the U-Net, ``merge_name`` for the text encoders."""
    return f"unet.{key}" if component == "unet" else merge_name(component, key)
