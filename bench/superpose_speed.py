"""Time per image of superposition relative to the vanilla diffusers pipeline (issue 6).

    python -m bench.superpose_speed [--steps 20] [--repeats 5]            # toy zoo, native size
    python -m bench.superpose_speed --sd15 --size 512 [--dtype float16]   # SD1.5-shaped, random

Same steps, same CFG, same device, same run. Two cases against ``StableDiffusionPipeline`` on one
model: two prompts on one model (one batched U-Net call per step: 2 conditional rows + 1 shared
unconditional row, where the vanilla pipeline runs 2 rows) and two different checkpoints (two U-Net
calls per step). ``--sd15`` builds Stable Diffusion 1.5's U-Net, VAE and CLIP text encoder shapes
from configs with random weights (nothing is downloaded; a word-level tokenizer stands in for
CLIP's), which times the real architecture without a checkpoint. Writes
``bench/results/superpose-speed-<cpu|cuda>[-sd15].json``; issue 6's targets: ≤ 1.1× for two
prompts on one model, ≤ 1.6× for two checkpoints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from bench import RESULTS
from composer import registry
from composer.device import device_name
from pipelines.superposition import SuperpositionPipeline


def sd15_pipes(dtype: torch.dtype, device: str) -> list[StableDiffusionPipeline]:
    """Two SD1.5-shaped pipelines with random weights sharing one VAE and text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from toyworld.tokenizer import save_tokenizer

    tokenizer = save_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer", model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    pipes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
        )  # the library's defaults are SD1.5's layout
        pipes.append(
            StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            ).to(device, dtype)
        )
    return pipes


def zoo_pipes(device: str) -> list[StableDiffusionPipeline]:
    return [
        registry.load_pipeline(registry.resolve_model(name), torch.device(device), torch.float32)
        for name in ("toy-warm", "toy-cool")
    ]


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(pipes, steps: int, size: int | None, repeats: int, device: str, cfg: float) -> dict:
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    first = pipes[0]
    common = {"num_inference_steps": steps, "guidance_scale": cfg, "height": size, "width": size}

    def generator():
        return torch.Generator(device=device).manual_seed(0)

    def vanilla():
        first(prompt="a red circle", generator=generator(), **common)

    one_model = SuperpositionPipeline.from_pipes([first])
    two_models = SuperpositionPipeline.from_pipes(pipes)
    for p in (one_model, two_models):
        p.set_progress_bar_config(disable=True)

    def two_prompts():
        one_model(experts=[(0, "a red shape"), (0, "a circle")], generator=generator(), **common)

    def two_checkpoints():
        two_models(prompt=["a circle", "a circle"], generator=generator(), **common)

    base = timed(vanilla, repeats, device)
    prompts = timed(two_prompts, repeats, device)
    checkpoints = timed(two_checkpoints, repeats, device)
    return {
        "vanilla_image_s": round(base, 4),
        "two_prompts_one_model_image_s": round(prompts, 4),
        "two_checkpoints_image_s": round(checkpoints, 4),
        "ratio_two_prompts_one_model": round(prompts / base, 3),
        "ratio_two_checkpoints": round(checkpoints / base, 3),
        "targets": {"ratio_two_prompts_one_model": 1.1, "ratio_two_checkpoints": 1.6},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.superpose_speed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sd15", action="store_true", help="SD1.5-shaped random weights")
    parser.add_argument("--size", type=int, default=None, help="image side (default: native)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    pipes = sd15_pipes(dtype, device) if args.sd15 else zoo_pipes(device)
    with torch.inference_mode():
        result = run(pipes, args.steps, args.size, args.repeats, device, args.cfg)
    result = {
        "benchmark": "superposition time per image relative to StableDiffusionPipeline",
        "device": device_name(),
        "torch": torch.__version__,
        "models": "SD1.5-shaped, random weights" if args.sd15 else "toy-warm, toy-cool",
        "size": args.size or "native",
        "dtype": args.dtype,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "repeats": args.repeats,
        **result,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"superpose-speed-{device}{'-sd15' if args.sd15 else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
