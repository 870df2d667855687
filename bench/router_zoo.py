"""The learned router against SuperDiff OR and AFA on the toy zoo (issue 23).

    python -m bench.router_zoo [--seeds 64] [--images 256]

1. Generation, "a circle" with toy-warm + toy-cool, ``--seeds`` seeds each: router mode (the
   bundled ``toy-warm-cool`` router), SuperDiff OR, and AFA (bundled aggregator): the share of
   warm colours (red, yellow) among the coloured images, and how often the shape is a circle.
2. Held-out denoising: ``--images`` freshly rendered images of the union of both experts'
   domains (seeds the router never saw), each noised at a random timestep; the ε-MSE of each
   expert alone, of ε averaging, and of the router's ensemble Σₖ rₖεₖ, with 95 % bootstrap
   intervals. The router's ensemble should be below each expert and below averaging.

Writes ``bench/results/router-zoo-<device>.json`` with the exact recipes and the router's time
per step against OR's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np
import torch

from bench import RESULTS
from composer import registry
from composer.device import device_name
from toyworld.measure import DEFAULT_SAMPLER, generate_labels

EXPERTS = [{"model": "toy-warm"}, {"model": "toy-cool"}]
CASES = {
    "router": {"method": "superpose", "superpose": {"mode": "router", "router": "toy-warm-cool"}},
    "superdiff_or": {"method": "superpose", "superpose": {"mode": "or"}},
    "afa": {"method": "aggregate", "aggregate": {"aggregator": "toy-warm-cool"}},
}
WARM, COOL = ("red", "yellow"), ("green", "blue")


def generation(seeds: int, cache) -> dict:
    out = {}
    for name, body in CASES.items():
        recipe = {"prompt": "a circle", "experts": EXPERTS, **body, "sampler": DEFAULT_SAMPLER}
        start = time.perf_counter()
        labels, seconds = generate_labels(recipe, seeds, cache)
        colours = Counter(c for c, _ in labels)
        coloured = sum(colours[c] for c in (*WARM, *COOL))
        out[name] = {
            "warm_share": round(sum(colours[c] for c in WARM) / coloured, 3) if coloured else None,
            "circle": round(sum(s == "circle" for _, s in labels) / seeds, 3),
            "colours": dict(colours.most_common()),
            "seconds_per_image": round(seconds / seeds, 4),
            "wall_s": round(time.perf_counter() - start, 1),
            "recipe": recipe,
        }
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "recipe"}), flush=True)
    return out


@torch.no_grad()
def denoising(images: int, cache) -> dict:
    from diffusers import DDPMScheduler

    from toyworld.render import render
    from toyworld.zoo import DOMAINS

    leases = [cache.lease(registry.resolve_model(e["model"])) for e in EXPERTS]
    pipes = [lease.__enter__().pipe for lease in leases]
    try:
        router = registry.load_router(registry.resolve_router("toy-warm-cool"), pipes[0].device)
        gen = torch.Generator().manual_seed(12345)
        pictures, captions = [], []
        for i in range(images):
            domain = DOMAINS["warm" if i % 2 == 0 else "cool"]
            color = domain.colors[(i // 2) % len(domain.colors)]
            shape = domain.shapes[(i // 4) % len(domain.shapes)]
            pictures.append(render(shape, color, 100_000 + i))
            captions.append(f"a {color} {shape}")
        pixels = torch.stack(
            [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1 for p in pictures]
        )
        vae = pipes[0].vae
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        scheduler = DDPMScheduler.from_config(pipes[0].scheduler.config)
        t = torch.randint(0, 1000, (images,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        eps = []
        for pipe in pipes:
            embeds = pipe.encode_prompt(captions, pipe.device, 1, False)[0]
            eps.append(pipe.unet(noisy, t, encoder_hidden_states=embeds).sample)
        weights = router.weights(noisy, t).float()  # (K, B)
        ensembles = {
            "toy-warm alone": eps[0],
            "toy-cool alone": eps[1],
            "epsilon averaging": (eps[0] + eps[1]) / 2,
            "router ensemble": sum(
                w.reshape(-1, 1, 1, 1) * e for w, e in zip(weights, eps, strict=True)
            ),
        }
        per_image = {k: ((v - noise) ** 2).mean((1, 2, 3)).numpy() for k, v in ensembles.items()}
    finally:
        for lease in leases:
            lease.__exit__(None, None, None)
    rng = np.random.default_rng(0)
    out = {}
    for name, errors in per_image.items():
        boot = [errors[rng.integers(0, len(errors), len(errors))].mean() for _ in range(1000)]
        out[name] = {
            "eps_mse": round(float(errors.mean()), 5),
            "ci95": [round(float(np.percentile(boot, 2.5)), 5),
                     round(float(np.percentile(boot, 97.5)), 5)],
        }  # fmt: skip
        print(name, out[name], flush=True)
    diff = per_image["router ensemble"] - per_image["epsilon averaging"]
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(1000)]
    out["router_minus_averaging"] = {
        "mean": round(float(diff.mean()), 5),
        "ci95": [round(float(np.percentile(boot, 2.5)), 5),
                 round(float(np.percentile(boot, 97.5)), 5)],
    }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.router_zoo")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args(argv)
    registry.quiet_libraries()
    cache = registry.ModelCache()
    start = time.time()
    result = {
        "benchmark": "router vs SuperDiff OR vs AFA on the toy zoo (issue 23)",
        "device": device_name(),
        "sampler": DEFAULT_SAMPLER,
        "seeds": args.seeds,
        "generation": generation(args.seeds, cache),
        "denoising": {"images": args.images, **denoising(args.images, cache)},
    }
    result["minutes"] = round((time.time() - start) / 60, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"router-zoo-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
