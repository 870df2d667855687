"""What adaptive feature aggregation (AFA) does on the toy zoo (issue 7).

    python -m bench.aggregate_zoo [--aggregator assets/aggregators/toy-warm-cool] [--seeds 128]

Writes ``bench/results/aggregate-zoo-<device>.json`` with three parts:

1. **Denoising error** on held-out (x₀, ε, t) triples (seeds the aggregator never saw) of
   toy-warm's domain, toy-cool's domain and two-object scenes: the mean ε-MSE of each expert
   alone, ε averaging (mean of the two experts' predictions), uniform feature averaging (the walk
   with w = ½ everywhere) and AFA, and for AFA minus each other method a paired bootstrap 95 %
   confidence interval (same triples, 2000 resamples).
2. **Generation**, counted by the evaluator: "a red circle" and "a blue square" (each expert's
   own domain) and two-object prompts at 64×32, where an image is right when the left half and the
   right half each show what the prompt names. Methods: each expert alone, ε averaging
   (``SuperpositionPipeline`` mode "average", the project's averaging baseline), the weighted-sum
   merge, uniform feature averaging and AFA. On a two-object prompt the ensembles give each
   expert its own object's caption ("a red circle" to toy-warm, "a blue square" to toy-cool;
   ``expert_parts``) and AFA's aggregators the whole prompt, as the aggregator was trained; a
   single model (an expert alone, the merge) can only read the whole prompt. Euler, 20 steps,
   CFG 5, batches of 32 images from a generator seeded with the batch's first seed.
3. **Speed**: seconds per 32×32 image (one image, 20 steps, CFG) for one expert, uniform feature
   averaging and AFA in the same run (median of 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from bench import RESULTS
from composer.device import device_name
from pipelines.aggregation import AggregationPipeline, Aggregator
from pipelines.aggregation.training import predict_noise
from pipelines.superposition import SuperpositionPipeline
from toyworld.captions import captions, parse_scene
from toyworld.evaluate import classify, classify_scene
from toyworld.train import encode_latents, encode_prompts, render_domain
from toyworld.train_aggregator import scene_data
from toyworld.zoo import DOMAINS, TRAIN_SCHEDULER

MODELS = Path("assets/models")
EXPERTS = ("toy-warm", "toy-cool")
SAMPLER = {"scheduler": "euler", "steps": 20, "guidance_scale": 5.0}
SINGLE_PROMPTS = {"a red circle": "toy-warm", "a blue square": "toy-cool"}
SCENE_PROMPTS = ("a red circle and a blue square", "a green triangle and a yellow square")
OWNER = {c: e for e in EXPERTS for c in DOMAINS[e.removeprefix("toy-")].colors}
"""Which expert owns each colour word: the expert whose own prompt an object's caption is."""


def expert_parts(prompt: str) -> list[str]:
    """Per expert (``EXPERTS`` order), the caption of the object of a two-object prompt in its
    colours, as ``toyworld.train_aggregator.scene_data`` gives them:
    "a green triangle and a yellow square" → ["a yellow square", "a green triangle"]."""
    objects = parse_scene(prompt)
    return [next(captions(*o)[0] for o in objects if OWNER[o[0]] == e) for e in EXPERTS]


HELD_OUT_SEED = 12345
BATCH = 32


def load_pipes() -> list[StableDiffusionPipeline]:
    pipes = []
    for name in EXPERTS:
        pipe = StableDiffusionPipeline.from_pretrained(
            MODELS / name, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def bootstrap_ci(diff: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean of paired differences ``diff``."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


@torch.no_grad()
def denoising_errors(pipes, aggregator: Aggregator, n: int) -> dict:
    vae, tokenizer, text_encoder = pipes[0].vae, pipes[0].tokenizer, pipes[0].text_encoder
    unets = [p.unet for p in pipes]
    scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    warm, warm_pairs = render_domain(DOMAINS["warm"], n, HELD_OUT_SEED)
    cool, cool_pairs = render_domain(DOMAINS["cool"], n, HELD_OUT_SEED + 1)
    scenes, scene_texts, scene_parts = scene_data(n, HELD_OUT_SEED + 2)
    warm_texts = [captions(c, s)[0] for c, s in warm_pairs]
    cool_texts = [captions(c, s)[0] for c, s in cool_pairs]
    domains = {  # images, the whole caption, each expert's caption (the same, but in scenes)
        "warm": (warm, warm_texts, [warm_texts, warm_texts]),
        "cool": (cool, cool_texts, [cool_texts, cool_texts]),
        "scenes": (scenes, scene_texts, [list(part) for part in zip(*scene_parts, strict=True)]),
    }
    out: dict = {}
    union: dict[str, list[np.ndarray]] = {}
    for domain, (images, texts, per_expert) in domains.items():
        mean, _ = encode_latents(vae, images, "cpu")
        gen = torch.Generator().manual_seed(HELD_OUT_SEED)
        noise = torch.randn(mean.shape, generator=gen)
        t = torch.randint(0, 1000, (len(mean),), generator=gen)
        cond = encode_prompts(tokenizer, text_encoder, texts)
        conds = [encode_prompts(tokenizer, text_encoder, part) for part in per_expert]
        errors: dict[str, list[torch.Tensor]] = {}
        for chunk in torch.arange(len(mean)).split(128):
            x = scheduler.add_noise(mean[chunk] * vae.config.scaling_factor, noise[chunk], t[chunk])
            c, e, tt = cond[chunk], noise[chunk], t[chunk]
            cs = [part[chunk] for part in conds]
            eps = [u(x, tt, ci).sample for u, ci in zip(unets, cs, strict=True)]
            predictions = {  # an expert alone reads the whole caption; ensembles, their parts
                "toy-warm": unets[0](x, tt, c).sample,
                "toy-cool": unets[1](x, tt, c).sample,
                "eps averaging": (eps[0] + eps[1]) / 2,
                "uniform feature averaging": predict_noise(None, unets, x, tt, cs),
                "afa": predict_noise(aggregator, unets, x, tt, cs, aggregator_text=c),
            }
            for name, p in predictions.items():
                errors.setdefault(name, []).append((p - e).pow(2).flatten(1).mean(1))
        per_sample = {k: torch.cat(v).numpy() for k, v in errors.items()}
        for k, v in per_sample.items():
            union.setdefault(k, []).append(v)
        out[domain] = _compare(per_sample)
    out["union"] = _compare({k: np.concatenate(v) for k, v in union.items()})
    for domain, specialist in (("warm", "toy-warm"), ("cool", "toy-cool")):
        out[domain]["afa_over_specialist"] = round(
            out[domain]["mse"]["afa"] / out[domain]["mse"][specialist], 4
        )
    out["triples_per_domain"] = n
    return out


def _compare(per_sample: dict[str, np.ndarray]) -> dict:
    afa = per_sample["afa"]
    return {
        "mse": {k: round(float(v.mean()), 5) for k, v in per_sample.items()},
        "afa_minus_ci95": {
            k: [round(x, 5) for x in bootstrap_ci(afa - v)]
            for k, v in per_sample.items()
            if k != "afa"
        },
    }


def merged_pipe(pipes) -> StableDiffusionPipeline:
    """The weighted-sum merge (½·θ_warm + ½·θ_cool) as a plain pipeline."""
    from composer.merge.methods import weighted_sum

    unet = type(pipes[0].unet).from_config(pipes[0].unet.config)
    states = [p.unet.state_dict() for p in pipes]
    unet.load_state_dict(
        {k: weighted_sum([s[k].float() for s in states], [1.0, 1.0]) for k in states[0]}
    )
    return StableDiffusionPipeline.from_pipe(pipes[0], unet=unet.eval())


def _images(run, seeds: int) -> list:
    images = []
    for start in range(0, seeds, BATCH):
        gen = torch.Generator().manual_seed(start)
        images += run(min(BATCH, seeds - start), gen)
    return images


def generation(pipes, aggregator: Aggregator, seeds: int) -> list[dict]:
    afa = AggregationPipeline.from_pipes(pipes, aggregator, list(EXPERTS))
    uniform = AggregationPipeline.from_pipes(pipes, None, list(EXPERTS))
    average = SuperpositionPipeline.from_pipes(pipes)
    merged = merged_pipe(pipes)
    for p in (afa, uniform, average, merged):
        p.set_progress_bar_config(disable=True)
    common = {
        "num_inference_steps": SAMPLER["steps"],
        "guidance_scale": SAMPLER["guidance_scale"],
        "output_type": "pil",
    }

    def plain(pipe):
        return lambda prompt, size: (
            lambda b, g: (
                pipe(
                    prompt,
                    height=size[0],
                    width=size[1],
                    num_images_per_prompt=b,
                    generator=g,
                    **common,
                ).images
            )
        )

    def ensemble(pipe, aggregator_reads_whole=False, **extra):
        """Each expert reads its part of a two-object prompt (``expert_parts``); AFA's
        aggregators read the whole prompt."""

        def run(prompt, size):
            scene = " and " in prompt
            prompts = expert_parts(prompt) if scene else prompt
            whole = {"aggregator_prompt": prompt} if scene and aggregator_reads_whole else {}
            return lambda b, g: (
                pipe(
                    prompts,
                    height=size[0],
                    width=size[1],
                    num_images_per_prompt=b,
                    generator=g,
                    **extra,
                    **whole,
                    **common,
                ).images
            )

        return run

    methods = {
        "toy-warm": plain(pipes[0]),
        "toy-cool": plain(pipes[1]),
        "eps averaging": ensemble(average, mode="average"),
        "weighted-sum merge": plain(merged),
        "uniform feature averaging": ensemble(uniform),
        "afa": ensemble(afa, aggregator_reads_whole=True),
    }
    rows = []
    jobs = [(p, (32, 32), [m, "uniform feature averaging", "afa"], False)
            for p, m in SINGLE_PROMPTS.items()]  # fmt: skip
    jobs += [(p, (32, 64), list(methods), True) for p in SCENE_PROMPTS]
    for prompt, size, names, scene in jobs:
        for name in names:
            start = time.perf_counter()
            images = _images(methods[name](prompt, size), seeds)
            seconds = time.perf_counter() - start
            rows.append(_score(prompt, name, images, scene, seconds, size))
            print(json.dumps({k: rows[-1][k] for k in ("prompt", "method", "accuracy")}),
                  flush=True)  # fmt: skip
    return rows


def _score(prompt: str, method: str, images: list, scene: bool, seconds: float, size) -> dict:
    if scene:
        wanted = parse_scene(prompt)
        labels = [classify_scene(im) for im in images]
        right = [(lft == wanted[0], rgt == wanted[1]) for lft, rgt in labels]
        outcome = Counter(f"{lft[0]} {lft[1]} | {rgt[0]} {rgt[1]}" for lft, rgt in labels)
        extra = {
            "left_right": sum(a for a, _ in right) / len(images),
            "right_right": sum(b for _, b in right) / len(images),
        }
        hits = sum(a and b for a, b in right)
    else:
        wanted = parse_scene(prompt)[0]
        labels = [classify(im) for im in images]
        outcome = Counter(f"{c} {s}" for c, s in labels)
        extra = {}
        hits = sum(label == wanted for label in labels)
    return {
        "prompt": prompt,
        "method": method,
        "size": {"height": size[0], "width": size[1]},
        "accuracy": round(hits / len(images), 4),
        **extra,
        "seeds": len(images),
        "outcomes": dict(outcome.most_common(8)),
        "seconds_per_image": round(seconds / len(images), 4),
    }


def speed(pipes, aggregator: Aggregator, repeats: int = 5) -> dict:
    afa = AggregationPipeline.from_pipes(pipes, aggregator, list(EXPERTS))
    uniform = AggregationPipeline.from_pipes(pipes, None, list(EXPERTS))
    runs = {"one expert": pipes[0], "uniform feature averaging": uniform, "afa": afa}
    out = {}
    for name, pipe in runs.items():
        pipe.set_progress_bar_config(disable=True)
        times = []
        for r in range(repeats + 1):
            start = time.perf_counter()
            pipe("a red circle", num_inference_steps=20, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(r))  # fmt: skip
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times[1:]), 4)
    out["afa_over_one_expert"] = round(out["afa"] / out["one expert"], 3)
    out["uniform_over_one_expert"] = round(out["uniform feature averaging"] / out["one expert"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregate_zoo", description=__doc__)
    parser.add_argument("--aggregator", default="assets/aggregators/toy-warm-cool")
    parser.add_argument("--seeds", type=int, default=128)
    parser.add_argument("--triples", type=int, default=1024)
    parser.add_argument("--skip", nargs="*", default=[], choices=["error", "generation", "speed"])
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/…)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipes = load_pipes()
    aggregator = Aggregator.from_pretrained(args.aggregator).eval()
    training = json.loads((Path(args.aggregator) / "training.json").read_text())
    started = time.time()
    result = {
        "benchmark": "adaptive feature aggregation on the toy zoo (issue 7)",
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "load_average_before": list(__import__("os").getloadavg()),
        "aggregator": {"path": args.aggregator, "training": training},
        "sampler": SAMPLER,
    }
    if "error" not in args.skip:
        result["denoising_error"] = denoising_errors(pipes, aggregator, args.triples)
        print(json.dumps(result["denoising_error"]["union"]), flush=True)
    if "generation" not in args.skip:
        result["generation"] = generation(pipes, aggregator, args.seeds)
    if "speed" not in args.skip:
        result["speed"] = speed(pipes, aggregator)
        print(json.dumps(result["speed"]), flush=True)
    result["minutes"] = round((time.time() - started) / 60, 1)
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"aggregate-zoo-{result['device'].split()[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
