"""Fixtures: tiny random SD 1.x and SDXL pipelines built from configs (after diffusers' own
tests), saved as diffusers folders, and a random LoRA for the SD 1.x one. No network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from toyworld.tokenizer import save_tokenizer

SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
TINY_SD1_UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}
TINY_SDXL_UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 1),
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
    "norm_num_groups": 4,
}
"""The tiny U-Nets of ``build_sd1`` / ``build_sdxl``, for tests that need only a U-Net."""


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=32,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )


def build_sd1(folder, seed: int = 0) -> str:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(folder / "tokenizer_build")
    unet = UNet2DConditionModel(**TINY_SD1_UNET)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "tiny-sd1", safe_serialization=True)
    return str(folder / "tiny-sd1")


def build_sdxl(folder, seed: int = 0) -> str:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(folder / "tokenizer_build")
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    config = _text_config(len(tokenizer))
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.save_pretrained(folder / "tiny-sdxl", safe_serialization=True)
    return str(folder / "tiny-sdxl")


def build_lora(model_dir: str, out, rank: int = 4, seed: int = 0) -> str:
    """A random (non-zero) PEFT LoRA on the U-Net's attention, in diffusers' file format."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return str(out / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> str:
    return build_sd1(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="session")
def tiny_sd1_other(tmp_path_factory) -> str:
    """A second tiny SD 1.x model with other random weights but the same VAE and schedule."""
    return build_sd1(tmp_path_factory.mktemp("sd1-other"), seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_lora(tiny_sd1, tmp_path_factory) -> str:
    return build_lora(tiny_sd1, tmp_path_factory.mktemp("lora"))
