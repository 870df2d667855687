r"""``AggregationPipeline``: Adaptive Feature Aggregation for Stable Diffusion 1.x/2.x and SDXL.

Wang et al., "Ensembling Diffusion Models via Adaptive Feature Aggregation", ICLR 2025. N
same-architecture U-Nets denoise in lock-step; after every block a trained aggregator
(``sabw.Aggregator``) blends their features per pixel (``walker.walk``). Without an aggregator
the features are averaged uniformly (what an untrained one does).

Unlike superposition this is one noise prediction per step, so any diffusers scheduler works
and classifier-free guidance acts on the final prediction, as in a plain Stable Diffusion
pipeline: ε = ε_AFA(∅) + w·(ε_AFA(c) − ε_AFA(∅)), both branches aggregated in one batched walk.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines.aggregation.sabw import Aggregator, uniform_combine
from pipelines.aggregation.walker import check_same_architecture, points, walk
from pipelines.ensemble import EnsemblePipeline, StepEndCallback


@dataclass
class AggregationPipelineOutput(BaseOutput):
    """Images and, when asked for (``return_maps=True``), the aggregation maps.

    ``maps``: one tensor per aggregation point (``point_names``), shaped (steps, B, N, h, w):
    the weight each expert had at each pixel of that point's features, for the conditional
    branch. ``None`` when not asked for.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    maps: list[torch.Tensor] | None = None
    point_names: list[str] | None = None


@dataclass
class _Expert:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """``None``: the pipeline's own text encoder(s)."""


class AggregationPipeline(EnsemblePipeline):
    r"""Text-to-image AFA ensemble of Stable Diffusion U-Nets.

    Components are those of a ``StableDiffusionPipeline`` (plus ``text_encoder_2`` and
    ``tokenizer_2`` for SDXL); ``unet`` is the first expert. Build it from ordinary pipelines with
    ``from_pipes(pipes, aggregator)``: every expert keeps its own text encoder(s), the VAE,
    tokenizers and scheduler are the first pipe's. ``aggregator`` may be ``None`` (uniform
    feature averaging).
    """

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def _setup(self) -> None:
        self.experts: list[_Expert] = [_Expert(self.unet)]
        self.aggregator: Aggregator | None = None

    @classmethod
    def from_pipes(
        cls,
        pipes: Sequence[StableDiffusionPipeline | StableDiffusionXLPipeline],
        aggregator: Aggregator | None = None,
        names: Sequence[str] | None = None,
    ) -> AggregationPipeline:
        """An ensemble of the pipes' U-Nets (expert i = ``pipes[i].unet``) and their text encoders.

        Raises ValueError naming both experts when the architectures differ, or when
        ``aggregator`` was trained for other experts or another order.
        """
        pipe = cls._around(pipes)
        names = list(names or [p.name_or_path or f"pipes[{i}]" for i, p in enumerate(pipes)])
        unets = [p.unet for p in pipes]
        check_same_architecture(unets, names)
        if aggregator is not None:
            aggregator.check_experts(unets, names)
        first = pipes[0]
        pipe.experts = [
            _Expert(
                p.unet,
                None if p.text_encoder is first.text_encoder else p.text_encoder,
                None
                if getattr(p, "text_encoder_2", None) is pipe.text_encoder_2
                else p.text_encoder_2,
            )
            for p in pipes
        ]
        pipe.aggregator = aggregator
        return pipe

    @property
    def unets(self) -> list[UNet2DConditionModel]:
        return [e.unet for e in self.experts]

    def _extra_modules(self) -> list[torch.nn.Module]:
        extra = [self.aggregator] if self.aggregator is not None else []
        for e in self.experts[1:]:
            extra += [m for m in (e.unet, e.text_encoder, e.text_encoder_2) if m is not None]
        return extra

    def _encode(
        self,
        prompts: Sequence[str | Sequence[str]],
        negative_prompt: str | None,
        batch: int,
        cfg: bool,
        height: int,
        width: int,
        device: torch.device,
    ) -> tuple[list[torch.Tensor], list[dict | None]]:
        """Per expert: its prompt's embeddings [negative (B)?, prompt (B)] and SDXL's added
        conditioning, each from the expert's own text encoder(s) (experts sharing the encoders
        and the prompt share one encoding). An expert's prompt may be a list of ``batch``
        captions (training) instead of one str repeated ``batch`` times."""
        texts, added, done = [], [], {}
        for expert, prompt in zip(self.experts, prompts, strict=True):
            key = (id(expert.text_encoder), id(expert.text_encoder_2), str(prompt))
            if key not in done:
                done[key] = self._encode_one(
                    expert, prompt, negative_prompt, batch, cfg, height, width, device
                )
            texts.append(done[key][0])
            added.append(done[key][1])
        return texts, added

    def _encode_one(self, expert, prompt, negative_prompt, batch, cfg, height, width, device):
        encoder = self.encoder_view(expert.unet, expert.text_encoder, expert.text_encoder_2)
        dtype = expert.unet.dtype
        per_prompt = batch if isinstance(prompt, str) else 1
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        embeds, neg, pooled, neg_pooled, time_ids = self.encode_prompt(
            prompt, device, per_prompt, cfg, negative_prompt, height, width, encoder
        )
        extra = None
        if time_ids is not None:
            extra = {
                "text_embeds": torch.cat([neg_pooled, pooled] if cfg else [pooled]).to(dtype),
                "time_ids": time_ids.repeat(2 * batch if cfg else batch, 1).to(dtype),
            }
        return torch.cat([neg, embeds] if cfg else [embeds]).to(dtype), extra

    @torch.no_grad()
    def encode_captions(
        self,
        captions: Sequence[str],
        height: int,
        width: int,
        expert_captions: Sequence[Sequence[str]] | None = None,
    ) -> tuple[list[torch.Tensor], list[dict | None], torch.Tensor | None]:
        """What a training step feeds ``walker.walk``: per expert, the embeddings of one caption
        per image (its own text encoder(s); no CFG branch) and SDXL's added conditioning for
        ``height`` × ``width`` images (``None`` for SD 1.x/2.x); then the aggregators' text.

        ``expert_captions`` (one list per expert): each expert reads its own caption per image
        while the aggregators read ``captions`` encoded by every expert and averaged, as
        ``__call__`` does with per-expert prompts and ``aggregator_prompt``. Without it every
        expert reads ``captions`` and the aggregators' text is ``None`` (the walk's mean of the
        experts' embeddings, which is then the same thing)."""
        batch = len(captions)
        device = self._execution_device
        whole = [list(captions)] * len(self.experts)
        if expert_captions is None:
            return (*self._encode(whole, None, batch, False, height, width, device), None)
        if len(expert_captions) != len(self.experts):
            raise ValueError(
                f"{len(self.experts)} experts but {len(expert_captions)} caption lists"
            )
        texts, added = self._encode(
            [list(c) for c in expert_captions], None, batch, False, height, width, device
        )
        together, _ = self._encode(whole, None, batch, False, height, width, device)
        return texts, added, torch.stack(together).mean(0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_maps: bool = False,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        aggregator_prompt: str | None = None,
    ) -> AggregationPipelineOutput | tuple:
        r"""Generate ``num_images_per_prompt`` images of ``prompt`` with the AFA ensemble.

        ``prompt`` is one str for every expert, or one per expert (each expert's U-Net then
        cross-attends to its own prompt). The aggregators see the mean of the experts' prompt
        embeddings, or ``aggregator_prompt`` when given: a caption of the whole image while each
        expert reads its part ("a red circle and a blue square" over ["a red circle", "a blue
        square"]), encoded by every expert's text encoder and averaged. The other
        arguments are those of ``StableDiffusionPipeline`` (the scheduler is ``pipe.scheduler``;
        swap it as usual). ``return_maps=True`` also returns, per aggregation
        point, each expert's weight at every pixel and step (``AggregationPipelineOutput.maps``).
        Setting ``pipe._interrupt = True`` in a callback stops after that step.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.default_size()
        width = width or self.default_size()
        self.check_inputs(height, width, callback_on_step_end_tensor_inputs)
        prompts = [prompt] * len(self.experts) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(self.experts):
            raise ValueError(
                f"give one prompt, or one per expert ({len(self.experts)}), not {len(prompts)}; "
                "use num_images_per_prompt for a batch"
            )
        self._interrupt = False
        self._guidance_scale = guidance_scale
        device = self._execution_device
        batch = num_images_per_prompt
        cfg = guidance_scale > 1.0
        texts, added = self._encode(prompts, negative_prompt, batch, cfg, height, width, device)
        aggregator_text = None
        if aggregator_prompt is not None:
            whole, _ = self._encode(
                [aggregator_prompt] * len(self.experts),
                negative_prompt,
                batch,
                cfg,
                height,
                width,
                device,
            )
            aggregator_text = torch.stack(whole).mean(0)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(
            batch,
            self.unet.config.in_channels,
            height,
            width,
            self.unet.dtype,
            device,
            generator,
            latents,
        )

        # As diffusers' prepare_extra: not every scheduler's step takes a generator
        # (UniPC and DPM-Solver++ multistep are deterministic and reject it).
        extra = (
            {"generator": generator}
            if "generator" in inspect.signature(self.scheduler.step).parameters
            else {}
        )
        aggregator = self.aggregator
        combine = aggregator.combine if aggregator is not None else uniform_combine
        history: list[list[torch.Tensor]] = []
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                step_maps: list[torch.Tensor] | None = [] if return_maps else None
                noise = walk(
                    self.unets,
                    model_input,
                    t,
                    texts,
                    lambda k, f, c, m=step_maps: combine(k, f, c, m),
                    added,
                    aggregator_text=aggregator_text,
                )
                if cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                step = self.scheduler.step(noise, t, latents, return_dict=False, **extra)
                latents = step[0]
                if step_maps is not None:
                    history.append([m[-batch:].to("cpu", torch.float16) for m in step_maps])
                if callback_on_step_end is not None:
                    step_kwargs = {"latents": latents}
                    requested = {k: step_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, requested) or {}
                    latents = returned.get("latents", latents)
                progress.update()
                if self._interrupt:
                    break

        images = self.decode_latents(latents, output_type)
        maps = [torch.stack(per_point) for per_point in zip(*history, strict=True)] or None
        point_names = [p.name for p in points(self.unet)] if return_maps else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, maps, point_names
        return AggregationPipelineOutput(images=images, maps=maps, point_names=point_names)
