"""What the composition pipelines share: Stable Diffusion's components around several U-Nets.

``SuperpositionPipeline`` and ``AggregationPipeline`` both hold one VAE, tokenizer(s), scheduler
and text encoder(s) (SDXL's second one optional) plus further experts' U-Nets, are built from
ordinary diffusers pipelines, move their extra modules with ``to()``, borrow
``encode_prompt`` from a plain SD/SDXL pipeline over the same modules, check their inputs, draw
their initial latents and decode alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.decoding import decode_latents

StepEndCallback = (
    Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
    | PipelineCallback
    | MultiPipelineCallbacks
)
"""diffusers' ``callback_on_step_end``: ``fn(pipe, step, timestep, callback_kwargs) -> dict``."""


def is_sdxl_unet(unet: UNet2DConditionModel) -> bool:
    """SDXL U-Nets take pooled text embeds and size ids (``addition_embed_type`` "text_time")."""
    return unet.config.get("addition_embed_type") == "text_time"


class PromptEmbeds(NamedTuple):
    """``EnsemblePipeline.encode_prompt``'s embeddings, named as diffusers names them; the
    negative ones are ``None`` without classifier-free guidance, the last three for SDXL only."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None


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

    def default_size(self) -> int:
        """The height and width diffusers defaults to: the U-Net's ``sample_size``, in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_inputs(
        self, height: int, width: int, callback_on_step_end_tensor_inputs: Sequence[str]
    ) -> None:
        """What diffusers' ``check_inputs`` refuses before any encoding: a size that is not whole
        latents, and step-callback tensors this pipeline does not hand out."""
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not among "
                f"{self._callback_tensor_inputs}"
            )
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be multiples of {self.vae_scale_factor}, "
                f"not {height}×{width}"
            )

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
        init_noise_sigma: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial latents, as ``StableDiffusionPipeline.prepare_latents``: unit noise drawn
        with ``generator`` (or the given ``latents``), on ``device`` in ``dtype``, times the
        scheduler's ``init_noise_sigma``, or times ``init_noise_sigma`` when given (a sampler with
        its own σ's, such as superposition's σ₀)."""
        shape = (
            batch_size,
            num_channels_latents,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"{len(generator)} generators for a batch of {batch_size}; give one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if init_noise_sigma is None:
            init_noise_sigma = self.scheduler.init_noise_sigma
        return latents.to(device=device, dtype=dtype) * init_noise_sigma

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        encoder: StableDiffusionPipeline | StableDiffusionXLPipeline | None = None,
    ) -> PromptEmbeds:
        """diffusers' ``encode_prompt`` for SD 1.x/2.x and SDXL alike, by ``encoder`` (default
        ``encoder_view()``), with SDXL's one row of ``add_time_ids`` for ``height`` × ``width``
        images."""
        encoder = encoder or self.encoder_view()
        if not is_sdxl_unet(self.unet):
            embeds, negative = encoder.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt=negative_prompt,
            )
            return PromptEmbeds(embeds, negative)
        embeds, negative, pooled, negative_pooled = encoder.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
        )
        time_ids = encoder._get_add_time_ids(
            (height, width), (0, 0), (height, width), embeds.dtype, int(pooled.shape[-1])
        ).to(device)
        return PromptEmbeds(embeds, negative, pooled, negative_pooled, time_ids)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """VAE decode (fp16 VAEs with ``force_upcast`` in fp32, as diffusers' SDXL pipeline)."""
        return decode_latents(self.vae, self.image_processor, latents, output_type)
