"""What the composition pipelines share: Stable Diffusion's components around several U-Nets.

``SuperpositionPipeline`` and ``AggregationPipeline`` both hold one VAE, tokenizer(s), scheduler
and text encoder(s) (SDXL's second one optional) plus further experts' U-Nets, are built from
ordinary diffusers pipelines, move their extra modules with ``to()``, borrow
``encode_prompt`` from a plain SD/SDXL pipeline over the same modules, and decode alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.decoding import decode_latents


def is_sdxl_unet(unet: UNet2DConditionModel) -> bool:
    """SDXL U-Nets take pooled text embeds and size ids (``addition_embed_type`` "text_time")."""
    return unet.config.get("addition_embed_type") == "text_time"


class EnsemblePipeline(DiffusionPipeline):
    """Base of the pipelines that sample with several U-Nets; ``unet`` is the first expert's."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._interrupt = False
        self._setup()

    def _setup(self) -> None:
        """A subclass's own state (its other experts), set at the end of ``__init__``."""

    @classmethod
    def _around(cls, pipes: Sequence[DiffusionPipeline]):
        """A new pipeline over the first pipe's components (shared, not copied)."""
        if not pipes:
            raise ValueError("from_pipes needs at least one pipeline")
        first = pipes[0]
        return cls(
            vae=first.vae,
            text_encoder=first.text_encoder,
            tokenizer=first.tokenizer,
            unet=first.unet,
            scheduler=first.scheduler,
            text_encoder_2=getattr(first, "text_encoder_2", None),
            tokenizer_2=getattr(first, "tokenizer_2", None),
            force_zeros_for_empty_prompt=first.config.get("force_zeros_for_empty_prompt", True),
        )

    def _extra_modules(self) -> list[torch.nn.Module]:
        """Modules outside diffusers' components that ``to()`` must move too."""
        return []

    def to(self, *args, **kwargs):
        """``DiffusionPipeline.to``, also moving/casting the other experts' modules."""
        super().to(*args, **kwargs)
        module_args = [a for a in args if isinstance(a, (str, torch.device, torch.dtype))]
        module_kwargs = {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
        for module in self._extra_modules():
            module.to(*module_args, **module_kwargs)
        return self

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encoder_view(
        self,
        unet: UNet2DConditionModel | None = None,
        text_encoder: CLIPTextModel | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
    ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """A plain diffusers pipeline over these modules (``None``: this pipeline's own), to reuse
        its ``encode_prompt`` and ``_get_add_time_ids``."""
        unet = unet or self.unet
        text_encoder = text_encoder or self.text_encoder
        if is_sdxl_unet(self.unet):
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2 or self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=unet,
                scheduler=self.scheduler,
                force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """VAE decode (fp16 VAEs with ``force_upcast`` in fp32, as diffusers' SDXL pipeline)."""
        return decode_latents(self.vae, self.image_processor, latents, output_type)
