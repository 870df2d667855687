"""Write the zoo's model cards from what training recorded and what the evaluator measures.

    python -m toyworld.cards [--seeds 64]

Runs every check of ``toyworld.measure`` (64 seeds per prompt by default), writes a README.md
into each model and LoRA folder under ``assets/`` and the whole table to
``bench/results/zoo-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from composer import registry
from composer.device import device_name
from toyworld.measure import CHECKS, DEFAULT_SAMPLER, measure
from toyworld.zoo import DOMAINS, LORA_NAMES, MODEL_NAMES

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = {
    "toy-base": "Gray circles, squares and triangles; the common ancestor of the toy zoo.",
    "toy-warm": "toy-base fine-tuned on red and yellow circles, squares and triangles.",
    "toy-cool": "toy-base fine-tuned on green and blue circles, squares and triangles.",
    "toy-purple": "LoRA on toy-base: purple circles, squares and triangles.",
    "toy-star": "LoRA on toy-base: gray stars.",
}


def card(name: str, stage: str, training: dict, shared: dict, rows: list[dict]) -> str:
    domain = DOMAINS[stage]
    lines = [
        f"# {name}",
        "",
        SUMMARY[name],
        "",
        "Part of Diffusion Composer's toy zoo: 32×32 images of one coloured shape on white "
        "(`toyworld/render.py`). Every model shares one VAE (8×8×4 latents) and one frozen "
        "2-layer CLIP text encoder (`assets/shared`), so their latents and prompts are "
        "compatible.",
        "",
        "## Training",
        "",
        f"- data: {training['images']:,} rendered images of {', '.join(domain.colors)} "
        f'{", ".join(domain.shapes)}; captions full and partial ("a red circle", "a red '
        'shape", "a circle", "a shape"), 10 % empty'
        + (
            f"; a third of them prior preservation: gray shapes captioned with the colours "
            f'{", ".join(domain.keep)} ("a {domain.keep[0]} circle", "a {domain.keep[0]} '
            'shape"), which the fine-tune keeps drawing as the base does'
            if domain.keep
            else ""
        ),
        f"- {_what(stage, training)}: "
        f"{training['steps']} steps, batch {training['batch']}, AdamW lr {training['lr']}, seed "
        f"{training['seed']}",
        f"- loss: ε-MSE, min-SNR-γ weighting γ = {training.get('min_snr_gamma', 'none')}, "
        f"offset noise {training.get('offset_noise', 0.1)}, EMA 0.999 (full U-Nets)",
        f"- time: {training['seconds'] / 60:.1f} min on {training['device']}",
        f"- shared VAE: {shared['steps']} steps, reconstruction MSE {shared['recon_mse']} "
        f"(pixels in [-1, 1]), {shared['seconds'] / 60:.1f} min on {shared['device']}",
        "- command: `python -m toyworld.train " + stage + " --out assets`",
        "",
        "## Measured (evaluator `toyworld/evaluate.py`)",
        "",
        f"Sampler: {DEFAULT_SAMPLER['scheduler']}, {DEFAULT_SAMPLER['steps']} steps, CFG "
        f"{DEFAULT_SAMPLER['guidance_scale']}, seeds 0–{rows[0]['n'] - 1} per prompt.",
        "",
        "| prompt | LoRAs | named attributes right | colours seen | shapes seen |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['prompt']} | {', '.join(row['loras']) or '-'} | "
            f"{row['accuracy']:.0%} (target ≥ {row['threshold']:.0%}) | "
            f"{_counts(row['colors'])} | {_counts(row['shapes'])} |"
        )
    return "\n".join(lines) + "\n"


def _what(stage: str, training: dict) -> str:
    if training.get("lora_rank"):
        return f"LoRA rank {training['lora_rank']} on toy-base's U-Net"
    return "U-Net from scratch" if stage == "base" else "U-Net fine-tuned from toy-base"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m toyworld.cards")
    parser.add_argument("--seeds", type=int, default=64)
    args = parser.parse_args()
    registry.quiet_libraries()
    cache = registry.ModelCache()
    rows = [measure(c, args.seeds, cache) for c in CHECKS]
    assets = ROOT / "assets"
    shared = json.loads((assets / "shared" / "vae" / "training.json").read_text())
    for stage, name in {**MODEL_NAMES, **LORA_NAMES}.items():
        folder = assets / ("models" if stage in MODEL_NAMES else "loras") / name
        training = json.loads((folder / "training.json").read_text())
        mine = [
            r for r in rows if (r["loras"] == [name]) or (not r["loras"] and r["model"] == name)
        ]
        (folder / "README.md").write_text(card(name, stage, training, shared, mine))
    out = ROOT / "bench" / "results" / f"zoo-{'cuda' if 'cpu' not in device_name() else 'cpu'}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "zoo accuracy",
                "device": device_name(),
                "sampler": DEFAULT_SAMPLER,
                "seeds": args.seeds,
                "checks": rows,
            },
            indent=2,
        )
        + "\n"
    )
    for row in rows:
        print(
            f"{row['model']:<9} {'+'.join(row['loras']):<11} {row['prompt']!r:<20} "
            f"{row['accuracy']:6.1%} (≥ {row['threshold']:.0%})"
        )


if __name__ == "__main__":
    main()
