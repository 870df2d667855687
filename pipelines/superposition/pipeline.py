r"""``SuperpositionPipeline``: SuperDiff for Stable Diffusion 1.x/2.x and SDXL, diffusers-style.

Skreta, Atanackovic, Bose, Tong, Neklyudov, "The Superposition of Diffusion Models Using the Itô
Density Estimator", ICLR 2025. Several experts — different U-Nets sharing one latent space, or
one U-Net with different prompts — are combined at sampling time: every step the drift is
Σᵢ κᵢ ε̃ᵢ with per-sample weights κ chosen from the experts' log-densities (OR: sample the mixture;
AND: stay where all experts' densities are equal), and the densities are tracked for free with
the Itô density estimator. The sampling math lives in ``sampler.sample_superposition``; this file
only turns Stable Diffusion U-Nets into its ``denoise(x, σ)``.

VE ↔ VP scaling
---------------
The sampler works in the variance-exploding form x = x₀ + σ·ε, σ decreasing to 0. Stable
Diffusion U-Nets were trained in the variance-preserving form x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε. The
two describe the same noisy sample up to a scale: with σ_t = √((1 − ᾱ_t)/ᾱ_t),

    x_t = √ᾱ_t·(x₀ + σ_t·ε) = x / √(σ_t² + 1),

so the U-Net is called on x / √(σ² + 1) at the training timestep t(σ), and the ε it predicts is
the very ε of the VE form (the same noise, only the signal is rescaled). The σ's and their t's are
the ones diffusers' ``EulerDiscreteScheduler`` computes from the model's own noise schedule (its
``sigmas`` end in 0). v-prediction U-Nets are converted to ε with ε = s·x_t + α·v,
α = 1/√(σ² + 1), s = σ/√(σ² + 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from pipelines.ensemble import EnsemblePipeline, StepEndCallback, is_sdxl_unet
from pipelines.superposition.adapters import Adapters, activate, check_adapters
from pipelines.superposition.sampler import sample_superposition

PIPELINE_MODES = ("or", "and", "average", "joint", "router")

Expert = (
    tuple[int | UNet2DConditionModel, str]
    | tuple[int | UNet2DConditionModel, str, Mapping[str, float] | None]
)
"""One expert: a U-Net (its index in ``pipe.unets``, or the module itself), its prompt and
optionally the LoRA adapters (loaded name → strength) active while it runs: ``{}`` for none,
``None`` (or a 2-tuple) to leave the adapters as they are. Two LoRA variants of one model are
two experts on one U-Net with different adapters: ``[(0, "a circle", {"purple": 1.0}),
(0, "a star", {"star": 1.0})]``."""

_VAE_KEYS = ("latent_channels", "scaling_factor", "block_out_channels")
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "prediction_type",
)


@dataclass
class SuperpositionPipelineOutput(BaseOutput):
    """Images and the per-step SuperDiff trace.

    ``images``: PIL images, a numpy array, or latents / a tensor (``output_type``).
    ``kappa``: (steps, N, B) float64, the weights κ used at each step, per expert and image.
    ``log_density``: (steps + 1, N, B) float64, every expert's log-density Lᵢ along the path,
    starting at 0 (only differences between experts are meaningful).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    kappa: torch.Tensor
    log_density: torch.Tensor


class _Interrupted(Exception):
    """Raised from the step callback to leave the sampling loop when ``pipe._interrupt`` is set."""


@dataclass
class _UNetBatch:
    """One U-Net's batched call: [uncond (B)?, expert₁ (B), …, expert_k (B)] along the batch."""

    unet: UNet2DConditionModel
    experts: list[int]
    embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    adapters: Adapters = None


def _family(unet: UNet2DConditionModel) -> str:
    return "SDXL" if is_sdxl_unet(unet) else "SD 1.x/2.x"


def _describe(pipe: DiffusionPipeline, index: int) -> str:
    name = pipe.name_or_path or type(pipe).__name__
    return f"pipes[{index}] ({name}, {_family(pipe.unet)})"


def check_same_latent_space(
    first: DiffusionPipeline, other: DiffusionPipeline, index: int = 1
) -> None:
    """Refuse to superpose pipelines whose latents or noise schedules differ.

    Superposition adds the experts' noise predictions for the same latent x at the same σ, so the
    experts must share the VAE latent space (channels, scaling factor, downsampling), the SD 1.x
    vs SDXL conditioning, and the training noise schedule (σ(t) and the prediction type).
    """
    a, b = _describe(first, 0), _describe(other, index)
    if is_sdxl_unet(first.unet) != is_sdxl_unet(other.unet):
        raise ValueError(
            f"{a} and {b} cannot be superposed: {_family(other.unet)} latents cannot be superposed "
            f"with {_family(first.unet)} latents"
        )
    for key in _VAE_KEYS:
        va, vb = first.vae.config.get(key), other.vae.config.get(key)
        if (list(va) if isinstance(va, (list, tuple)) else va) != (
            list(vb) if isinstance(vb, (list, tuple)) else vb
        ):
            raise ValueError(
                f"{a} and {b} cannot be superposed: their VAE latent spaces differ "
                f"(vae.config.{key} {va!r} vs {vb!r})"
            )
    for key in _SCHEDULE_KEYS:
        va, vb = first.scheduler.config.get(key), other.scheduler.config.get(key)
        if va != vb:
            raise ValueError(
                f"{a} and {b} cannot be superposed: their noise schedules differ "
                f"(scheduler.config.{key} {va!r} vs {vb!r})"
            )


def _to_epsilon(out: torch.Tensor, x_vp: torch.Tensor, sigma: float, prediction_type: str):
    """The U-Net output as ε (see the module docstring for the v → ε conversion)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return sigma * alpha * x_vp + alpha * out
    raise ValueError(
        f"scheduler.config.prediction_type {prediction_type!r} is not supported; "
        "use 'epsilon' or 'v_prediction'"
    )


class SuperpositionPipeline(EnsemblePipeline):
    r"""Text-to-image superposition of Stable Diffusion experts (SuperDiff, Skreta et al. 2025).

    Components are those of a ``StableDiffusionPipeline`` (``vae``, ``text_encoder``,
    ``tokenizer``, ``unet``, ``scheduler``) plus, for SDXL, ``text_encoder_2`` and
    ``tokenizer_2``. ``unet`` is the first expert's U-Net; further experts' U-Nets are in
    ``extra_unets`` (see ``from_pipes`` and ``add_unet``) or are passed directly in ``experts``.
    All experts share the text encoder(s), the VAE and the noise schedule of this pipeline.

    Sampling always uses the Euler–Maruyama discretisation of the reverse SDE with the σ's of
    ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``: the Itô density estimator
    is only valid for that sampler (the scheduler's own ``step`` is not used).
    """

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "denoised", "kappa", "log_density"]

    def _setup(self) -> None:
        self.extra_unets: list[UNet2DConditionModel] = []

    @classmethod
    def from_pipes(
        cls, pipes: Sequence[StableDiffusionPipeline | StableDiffusionXLPipeline]
    ) -> SuperpositionPipeline:
        """A superposition of the pipes' U-Nets (expert i = ``pipes[i].unet``).

        The VAE, text encoder(s), tokenizer(s) and scheduler are shared with ``pipes[0]`` (no
        copies). Raises ValueError naming both pipes if one's latent space or noise schedule
        differs from the first's (``check_same_latent_space``).
        """
        pipe = cls._around(pipes)
        for i, other in enumerate(pipes[1:], start=1):
            check_same_latent_space(pipes[0], other, i)
        for other in pipes[1:]:
            pipe.add_unet(other.unet)
        return pipe

    @property
    def unets(self) -> list[UNet2DConditionModel]:
        """The experts' U-Nets by index: ``unet`` first, then ``extra_unets``."""
        return [self.unet, *self.extra_unets]

    def add_unet(self, unet: UNet2DConditionModel) -> int:
        """Add an expert U-Net (same latent space as ``unet``); returns its index in ``unets``."""
        if is_sdxl_unet(unet) != is_sdxl_unet(self.unet):
            raise ValueError(
                f"cannot add a {_family(unet)} U-Net to a {_family(self.unet)} pipeline: "
                f"{_family(unet)} latents cannot be superposed with {_family(self.unet)} latents"
            )
        self.extra_unets.append(unet)
        return len(self.extra_unets)

    def _extra_modules(self) -> list[torch.nn.Module]:
        return list(self.extra_unets)

    def _resolve_experts(
        self, prompt: str | list[str] | None, experts: Sequence[Expert] | None
    ) -> list[tuple[UNet2DConditionModel, str, Adapters]]:
        unets = self.unets
        if experts is None:
            if prompt is None:
                raise ValueError("give a prompt (str or one per U-Net) or experts")
            prompts = [prompt] * len(unets) if isinstance(prompt, str) else list(prompt)
            if len(prompts) != len(unets):
                raise ValueError(
                    f"prompt is a list of {len(prompts)} prompts for {len(unets)} U-Nets; "
                    "give one prompt per U-Net, a single str, or experts=[(unet_index, prompt), …]"
                )
            return [(unet, text, None) for unet, text in zip(unets, prompts, strict=True)]
        if prompt is not None:
            raise ValueError("give either prompt or experts (each expert carries its own prompt)")
        if not experts:
            raise ValueError("experts is empty; give at least one (unet_index, prompt) pair")
        resolved = []
        for expert in experts:
            if len(expert) not in (2, 3):
                raise ValueError(
                    f"an expert is (unet, prompt) or (unet, prompt, adapters), not {expert!r}"
                )
            unet, text = expert[0], expert[1]
            adapters = expert[2] if len(expert) == 3 else None
            if adapters is not None:
                adapters = tuple((str(name), float(w)) for name, w in dict(adapters).items())
            if isinstance(unet, int):
                if not 0 <= unet < len(unets):
                    raise ValueError(
                        f"expert U-Net index {unet} is out of range: this pipeline has "
                        f"{len(unets)} U-Net(s), indices 0..{len(unets) - 1}"
                    )
                unet = unets[unet]
            if is_sdxl_unet(unet) != is_sdxl_unet(self.unet):
                raise ValueError(
                    f"an expert's {_family(unet)} U-Net cannot be superposed with this "
                    f"{_family(self.unet)} pipeline's latents"
                )
            if adapters:
                check_adapters(adapters, unet, self._text_encoders())
            resolved.append((unet, text, adapters))
        return resolved

    def _text_encoders(self) -> list[torch.nn.Module | None]:
        return [self.text_encoder, getattr(self, "text_encoder_2", None)]

    def _unet_batches(
        self,
        experts: list[tuple[UNet2DConditionModel, str, Adapters]],
        negative_prompt: str | None,
        batch: int,
        height: int,
        width: int,
        cfg: bool,
        device: torch.device,
    ) -> list[_UNetBatch]:
        """Encode every expert's prompt once and group the experts by U-Net module and adapters.

        Experts on the same U-Net with the same adapters become one batched call whose batch is
        [negative prompt (if ``cfg``), expert₁, …, expert_k], B images each. Each group's prompts
        are encoded with its adapters active, so LoRAs that also train the text encoder apply
        to their own experts only.
        """
        members: dict[tuple[int, Adapters], list[int]] = {}
        for e, (unet, _, adapters) in enumerate(experts):
            members.setdefault((id(unet), adapters), []).append(e)
        encoder = self.encoder_view()
        groups = []
        for indices in members.values():
            unet, _, adapters = experts[indices[0]]
            activate(adapters, unet, self._text_encoders())
            prompts = [experts[e][1] for e in indices]
            negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
            embeds, neg_embeds, pooled, neg_pooled, time_ids = self.encode_prompt(
                prompts, device, batch, cfg, negatives, height, width, encoder
            )
            added_cond_kwargs = None
            if time_ids is not None:
                text = ([neg_pooled[:batch]] if cfg else []) + [pooled]
                rows = len(prompts) + int(cfg)
                added_cond_kwargs = {
                    "text_embeds": torch.cat(text).to(unet.dtype),
                    "time_ids": time_ids.repeat(rows * batch, 1).to(unet.dtype),
                }
            embeds = torch.cat(([neg_embeds[:batch]] if cfg else []) + [embeds])
            embeds = embeds.to(unet.device, unet.dtype)  # a U-Net may sit on another GPU
            if added_cond_kwargs is not None:
                added_cond_kwargs = {k: v.to(unet.device) for k, v in added_cond_kwargs.items()}
            groups.append(_UNetBatch(unet, indices, embeds, added_cond_kwargs, adapters))
        return groups

    def _denoiser(
        self,
        groups: list[_UNetBatch],
        n_experts: int,
        timestep_of: dict[float, torch.Tensor],
        cfg: bool,
        cuda_streams: bool = False,
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]:
        """``denoise(x, σ)`` for ``sample_superposition``: one U-Net call per U-Net per step;
        with ``cuda_streams`` (and distinct U-Nets on a CUDA device) each call on its own
        stream, the step's results joined on the current one."""
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        # adapters are switched per call only where one U-Net runs with several adapter sets
        unets = [id(g.unet) for g in groups if g.adapters is not None]
        switching = len(unets) != len(set(unets))
        if not switching:
            for group in groups:
                activate(group.adapters, group.unet, self._text_encoders())
        device = self._execution_device
        streams = (
            [torch.cuda.Stream(device) for _ in groups]
            if cuda_streams
            and device.type == "cuda"
            and len(groups) > 1
            and not switching
            and all(g.unet.device == device for g in groups)  # placed experts: their own GPUs
            else None
        )

        def call(group: _UNetBatch, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if switching:
                activate(group.adapters, group.unet, self._text_encoders())
            k = len(group.experts) + int(cfg)
            # Experts may be placed on several GPUs (one model each, composer.serve.placement):
            # only the latents go out and the predictions come back; no-ops on one device.
            here = group.unet.device
            return group.unet(
                x_vp.to(here, group.unet.dtype).repeat(k, *([1] * (x_vp.dim() - 1))),
                t.to(here),
                encoder_hidden_states=group.embeds,
                added_cond_kwargs=group.added_cond_kwargs,
                return_dict=False,
            )[0].to(device)

        def call_on_streams(x_vp: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
            main = torch.cuda.current_stream(device)
            outs = []
            for group, stream in zip(groups, streams, strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    outs.append(call(group, x_vp, t))
            for stream, out in zip(streams, outs, strict=True):
                main.wait_stream(stream)
                out.record_stream(main)
            return outs

        def denoise(x: torch.Tensor, sigma: torch.Tensor):
            s = float(sigma)
            x_vp = x / math.sqrt(s * s + 1.0)
            t = timestep_of[s]
            eps: list[torch.Tensor | None] = [None] * n_experts
            eps_uncond: list[torch.Tensor | None] = [None] * n_experts
            if streams is not None:
                outs = call_on_streams(x_vp, t)
            else:
                outs = [call(group, x_vp, t) for group in groups]
            for group, out in zip(groups, outs, strict=True):
                k = len(group.experts) + int(cfg)
                chunks = [
                    _to_epsilon(c.to(x.dtype), x_vp, s, prediction_type) for c in out.chunk(k)
                ]
                uncond = chunks.pop(0) if cfg else None
                for e, c in zip(group.experts, chunks, strict=True):
                    eps[e], eps_uncond[e] = c, uncond
            return (torch.stack(eps_uncond) if cfg else None), torch.stack(eps)

        return denoise

    @staticmethod
    def _router_weights(router, timestep_of: dict[float, torch.Tensor]):
        """κ(x, σ) from ``router``, which reads the VP latent x/√(σ²+1) and the timestep."""

        def weights(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = float(sigma)
            x_vp = (x / math.sqrt(s * s + 1.0)).to(router.device, router.dtype)
            return router.weights(x_vp, timestep_of[s].reshape(1).to(router.device))

        return weights

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        temperature: float | None = None,
        bias: torch.Tensor | Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        mode: str = "or",
        experts: Sequence[Expert] | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        cuda_streams: bool = False,
        router: torch.nn.Module | None = None,
    ) -> SuperpositionPipelineOutput | tuple:
        r"""Generate ``num_images_per_prompt`` images from a superposition of the experts.

        Args:
            prompt: one str for every U-Net in ``unets``, or one prompt per U-Net. Leave it None
                when ``experts`` is given.
            negative_prompt: the unconditional branch of classifier-free guidance, shared by all
                experts (one batched unconditional prediction per U-Net).
            guidance_scale: CFG weight w; guidance acts on the drift only, the densities are
                those of the unguided conditional experts. No unconditional branch when w ≤ 1.
            generator: one ``torch.Generator`` (on the pipeline's device) for the initial noise
                and every Euler–Maruyama step, or a list with one per image (as in diffusers):
                image b then draws its initial and step noise from generator b only, so it is
                the image that generator gives alone (up to the batch's float rounding).
            mode: ``"or"`` (κ = softmax(T·L + bias): the mixture of the experts), ``"and"`` (κ
                keeps all experts' densities equal), ``"average"`` (fixed κ = 1/N or
                softmax(bias): the paper's averaging baseline) or ``"joint"`` (the paper's other
                baseline: one prompt, the experts' prompts joined with " and ", through the first
                expert's U-Net with ordinary CFG, sampled with the same SDE; N = 1 in the trace).
            temperature: T of OR. ``None`` (the default) is the guidance scale w, so that OR
                samples the mixture of the *guided* experts, what each draws alone at this CFG:
                guided expert i follows the score ∇log q_u + w(∇log qᵢ − ∇log q_u), the score of
                q_u^{1−w}·qᵢ^w, whose log differs between experts by w·(log qᵢ − log qⱼ); its
                mixture weights are therefore softmax(w·L + b), not softmax(L + b). With T = 1
                and w > 1 the weights stay too soft and OR drifts towards averaging: on two
                mixture-of-Gaussian experts sharing one mode (tests/test_superposition_sampler.py)
                w = 5 gives the shared mode 97 % of the time at T = 1 against 60 % at T = w (the
                mixture's is 50 %). T = 1 with w = 1 is the paper's unguided OR.
            bias: the per-expert log-weights of OR (and of average): b = log of target shares.
            experts: ``[(unet_index_or_module, prompt), …]``; the default is one expert per U-Net
                of ``unets``. Two prompts on one model: ``[(0, "a red shape"), (0, "a circle")]``.
            latents: optional initial noise ε (B, C, h, w) of unit variance; it is scaled by σ₀.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each
                step, with the requested ``callback_on_step_end_tensor_inputs`` among
                ``latents`` (x at the next σ, VE form), ``denoised`` (the step's Tweedie
                estimate), ``kappa`` (N, B) and ``log_density`` (N, B). A returned ``latents``
                replaces x. Setting ``pipe._interrupt = True`` stops after that step; the latents
                reached so far are decoded (still noisy, as in diffusers).
            router: for ``mode="router"``, a ``pipelines.superposition.router.Router`` over
                the experts in their order: κ = r(x_t, t), its posterior over the experts'
                training partitions, at every step (Decentralized Diffusion Models).
            cuda_streams: on a CUDA device, run experts whose U-Nets differ on separate CUDA
                streams, so that their calls can overlap (``bench.gpu_switches`` measures it).

        Returns:
            ``SuperpositionPipelineOutput(images, kappa, log_density)``, or the tuple
            ``(images, kappa, log_density)`` if ``return_dict`` is False.
        """
        if mode not in PIPELINE_MODES:
            raise ValueError(f"mode must be one of {PIPELINE_MODES}, not {mode!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(
                "negative_prompt must be one str: every expert shares one unconditional branch"
            )
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.default_size()
        width = width or self.default_size()
        self.check_inputs(height, width, callback_on_step_end_tensor_inputs)
        resolved = self._resolve_experts(prompt, experts)
        if mode == "router" and (router is None or router.config.num_experts != len(resolved)):
            raise ValueError(
                f"mode 'router' needs a router over the {len(resolved)} experts, in their order"
            )
        if mode == "joint":
            joined = " and ".join(text for _, text, _ in resolved)
            resolved = [(resolved[0][0], joined, resolved[0][2])]
            sampler_mode, bias = "average", None
        else:
            sampler_mode = mode
        self._interrupt = False
        self._guidance_scale = guidance_scale
        device = self._execution_device
        batch = num_images_per_prompt
        cfg = guidance_scale > 1.0

        groups = self._unet_batches(resolved, negative_prompt, batch, height, width, cfg, device)

        scheduler = EulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = scheduler.sigmas.to(device)
        timestep_of = {float(s): t for s, t in zip(sigmas[:-1], scheduler.timesteps, strict=True)}
        self._num_timesteps = len(scheduler.timesteps)

        x = self.prepare_latents(
            batch,
            self.unet.config.in_channels,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
            init_noise_sigma=sigmas[0],
        )

        kappas: list[torch.Tensor] = []
        history: list[torch.Tensor] = []
        with self.progress_bar(total=len(sigmas) - 1) as progress:

            def on_step(info: dict) -> None:
                nonlocal x
                if not history:
                    history.append(torch.zeros_like(info["log_density"]))
                kappas.append(info["kappa"])
                history.append(info["log_density"])
                x = info["x"]
                if callback_on_step_end is not None:
                    step_kwargs = {
                        "latents": info["x"],
                        "denoised": info["denoised"],
                        "kappa": info["kappa"],
                        "log_density": info["log_density"],
                    }
                    requested = {k: step_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                    t = scheduler.timesteps[info["i"]]
                    returned = callback_on_step_end(self, info["i"], t, requested) or {}
                    if "latents" in returned:
                        info["x"].copy_(returned["latents"])
                progress.update()
                if self._interrupt:
                    raise _Interrupted

            with contextlib.suppress(_Interrupted):
                sample_superposition(
                    self._denoiser(groups, len(resolved), timestep_of, cfg, cuda_streams),
                    x,
                    sigmas,
                    mode=sampler_mode,
                    guidance_scale=guidance_scale,
                    temperature=guidance_scale if temperature is None else temperature,
                    bias=bias,
                    generator=generator,
                    callback=on_step,
                    router=None if router is None else self._router_weights(router, timestep_of),
                )

        images = self.decode_latents(x, output_type)
        kappa = torch.stack(kappas)
        log_density = torch.stack(history)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, kappa, log_density
        return SuperpositionPipelineOutput(images=images, kappa=kappa, log_density=log_density)
