"""Latents → images, shared by the composition pipelines (one VAE, as in diffusers' own)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor


def decode_latents(
    vae: AutoencoderKL, processor: VaeImageProcessor, latents: torch.Tensor, output_type: str
):
    """VAE decode (fp16 VAEs with ``force_upcast`` decode in fp32, as in diffusers' SDXL
    pipeline) and ``VaeImageProcessor`` postprocessing; ``"latent"`` returns the latents."""
    if output_type == "latent":
        return latents
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    dtype = torch.float32 if upcast else vae.dtype
    image = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return processor.postprocess(image, output_type=output_type)
