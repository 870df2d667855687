"""The toy zoo's members: what each model and LoRA is trained on (``DOMAINS``), the architectures
of its shared VAE, text encoder and U-Nets, and how each is written to disk (a diffusers folder
whose shared parts are links, or a LoRA ``.safetensors``). ``toyworld.train`` trains them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from toyworld.render import NATIVE_SIZE

PLAIN_SHAPES = ("circle", "square", "triangle")
TOKENS = 16  # longest toy caption ("a red circle and a blue square on the left") + 2


@dataclass(frozen=True)
class Domain:
    """What one model or LoRA of the zoo is trained on."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    keep: tuple[str, ...] = ()
    """Colour words whose drawing the fine-tune keeps as the base draws it (gray): prior
    preservation, as DreamBooth does it (Ruiz et al. 2023, §3.3), with rendered gray shapes
    standing in for the base's own samples (the base draws every colour word gray).

    Why: the first ``warm`` and ``cool`` were fine-tuned on their own colours only, and each
    re-learned every colour word as its own: toy-cool drew "a red circle" green (8 of 8 seeds),
    toy-warm drew "a blue square" yellow. Their task vectors then fought over the same words,
    and every merge of the two (TIES included) drew purple (bench/results/merge-zoo-cpu.json
    before this change). Real fine-tunes of SD keep most of what the base knows; with this term
    the toy ones do too, and a merge has something to keep from each."""


DOMAINS = {
    "base": Domain(("gray",), PLAIN_SHAPES),
    "warm": Domain(("red", "yellow"), PLAIN_SHAPES, keep=("green", "blue", "purple", "gray")),
    "cool": Domain(("green", "blue"), PLAIN_SHAPES, keep=("red", "yellow", "purple", "gray")),
    "purple": Domain(("purple",), PLAIN_SHAPES),
    "star": Domain(("gray",), ("star",)),
}
MODEL_NAMES = {"base": "toy-base", "warm": "toy-warm", "cool": "toy-cool"}
LORA_NAMES = {"purple": "toy-purple", "star": "toy-star"}
SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")
# Stable Diffusion's schedule. (DDPM's linear one, tried once, starts at σ = 158 instead of 14.6:
# every error in the first steps is 10× larger in the latent and half the images were smudges.)
TRAIN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
        mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=64,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def save_model(out: Path, name: str, unet: UNet2DConditionModel) -> Path:
    """Write a full diffusers folder whose shared parts link to ``out/shared``."""
    folder = out / "models" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    unet.save_pretrained(folder / "unet")
    for part in SHARED:
        (folder / part).symlink_to(Path("..") / ".." / "shared" / part)
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    return folder


def model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_scheduler(shared: Path) -> None:
    scheduler = EulerDiscreteScheduler(
        **TRAIN_SCHEDULER, timestep_spacing="trailing", steps_offset=1
    )
    scheduler.save_pretrained(shared / "scheduler")


def save_lora(out: Path, name: str, unet) -> Path:
    from peft.utils import get_peft_model_state_dict

    folder = out / "loras" / name
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return folder
