"""Diffusion Composer's page: layout and event wiring only. ``python app.py`` serves it.

Every action goes through a recipe: the controls are turned into recipe JSON, parsed by
``composer.recipe.parse`` (the one validation), run by ``composer.engine``; a dropped PNG or a
pasted recipe is parsed the same way and written back into the controls.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import uuid
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gradio as gr

from composer import engine, registry
from composer.pnginfo import read_recipe
from composer.recipe import A1111_SAMPLERS, MAX_IMAGES, MAX_STEPS, RecipeError, parse

log = logging.getLogger("composer.app")
LORA_SLOTS = 3
PAGE_METHODS = ("single",)
"""Methods the controls can express; any method the engine runs works from the Recipe panel."""
OUTPUT_DIR = Path(tempfile.gettempdir()) / "composer-outputs"
SAMPLER_CHOICES = [(name, key) for name, key in A1111_SAMPLERS.items() if key != "ddpm"]
_CANCEL: dict[str, threading.Event] = {}


def default_model() -> str:
    models = registry.bundled("models")
    return registry.DEFAULT_MODEL if registry.DEFAULT_MODEL in models else next(iter(models), "")


# --- controls ⇄ recipe --------------------------------------------------------------------------


def recipe_dict(method, model, *values) -> dict:
    """The controls' values (in ``CONTROLS`` order) → recipe JSON."""
    loras_flat, rest = values[: 2 * LORA_SLOTS], values[2 * LORA_SLOTS :]
    prompt, negative, scheduler, steps, cfg, seed, width, height, count = rest
    loras = [
        {"path": path, "weight": weight}
        for path, weight in zip(loras_flat[::2], loras_flat[1::2], strict=False)
        if path
    ]
    return {
        "version": 1,
        "prompt": prompt,
        "negative_prompt": negative,
        "method": method,
        "experts": [{"model": model, "loras": loras, "prompt": None, "weight": 1.0}],
        "sampler": {
            "scheduler": scheduler,
            "steps": steps,
            "guidance_scale": cfg,
            "seed": seed,
            "width": width or None,
            "height": height or None,
            "num_images": count,
        },
    }


def control_values(recipe) -> list:
    """A parsed recipe → the controls' values (in ``CONTROLS`` order)."""
    expert = recipe.experts[0]
    loras = []
    for j in range(LORA_SLOTS):
        lo = expert.loras[j] if j < len(expert.loras) else None
        loras += [lo.path if lo else None, lo.weight if lo else 1.0]
    s = recipe.sampler
    return [
        recipe.method,
        expert.model,
        *loras,
        recipe.expert_prompt(0),
        recipe.negative_prompt,
        s.scheduler,
        s.steps,
        s.guidance_scale,
        s.seed,
        s.width or 0,
        s.height or 0,
        s.num_images,
    ]


# --- handlers -----------------------------------------------------------------------------------


def run_recipe(recipe_json: str, progress=gr.Progress(), request: gr.Request = None):
    """Generate from recipe JSON: the page's Generate button and the ``generate`` API endpoint."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    key = request.session_hash if request is not None else uuid.uuid4().hex
    cancel = _CANCEL[key] = threading.Event()
    try:
        result = engine.generate(
            recipe,
            cancel=cancel,
            progress=lambda done, total: progress((done, total), desc="Sampling", unit="steps"),
        )
    except engine.Cancelled as e:
        gr.Info(f"Stopped; {len(e.images)} image(s) were finished.")
        return [], recipe.to_json(), "Stopped."
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # keep the server up for the next user; the log has the traceback
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {e.__class__.__name__}: {e}") from None
    finally:
        _CANCEL.pop(key, None)
    folder = OUTPUT_DIR / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    gallery = []
    for i, (image, info) in enumerate(zip(result.images, result.metadata, strict=False)):
        path = folder / f"{i:05d}.png"
        image.save(path, format="PNG", pnginfo=info)
        gallery.append((str(path), f"seed {result.seeds[i]}"))
    status = (
        f"{len(result.images)} image(s), {sum(result.seconds):.2f} s on {result.device} "
        f"({sum(result.seconds) / max(len(result.images), 1):.2f} s per image)"
    )
    return gallery, recipe.to_json(), status


def run_controls(*values, progress=gr.Progress(), request: gr.Request = None):
    return run_recipe(json.dumps(recipe_dict(*values)), progress, request)


def stop(request: gr.Request):
    event = _CANCEL.get(request.session_hash)
    if event is not None:
        event.set()


def restore(recipe) -> list:
    """Controls and Recipe panel for ``recipe``; a method the controls cannot show yet goes to
    the Recipe panel only, from where it can be run as it is."""
    if recipe.method not in PAGE_METHODS:
        gr.Info(
            f"This recipe uses method {recipe.method!r}: it is in the Recipe panel, from where "
            "“Generate from this recipe” runs it."
        )
        return [gr.update()] * len(CONTROLS) + [recipe.to_json()]
    return [*control_values(recipe), recipe.to_json()]


def restore_from_recipe(recipe_json: str):
    try:
        recipe = parse(recipe_json)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return restore(recipe)


def restore_from_png(image):
    if image is None:
        return [gr.update()] * (len(CONTROLS) + 1)
    try:
        recipe = read_recipe(image)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if recipe.method in PAGE_METHODS:
        gr.Info("Controls restored from the image's recipe.")
    return restore(recipe)


def current_recipe(*values) -> str:
    return json.dumps(recipe_dict(*values), indent=2)


# --- layout -------------------------------------------------------------------------------------

CONTROLS: list = []


def build() -> gr.Blocks:
    models = list(registry.bundled("models"))
    loras = list(registry.bundled("loras"))
    with gr.Blocks(title="Diffusion Composer") as demo:
        gr.Markdown(
            "# Diffusion Composer\nCombine Stable Diffusion checkpoints and LoRAs in one "
            "generation. Every image carries its recipe: drop it back here to restore it."
        )
        with gr.Row():
            with gr.Column(scale=5):
                method = gr.Dropdown(
                    list(PAGE_METHODS),
                    value="single",
                    label="Method",
                    info="Superposition (SuperDiff OR/AND) runs from a recipe in the Recipe "
                    "panel for now; its own controls come next.",
                )
                model = gr.Dropdown(
                    models,
                    value=default_model(),
                    allow_custom_value=True,
                    label="Model",
                    info="A bundled model, a local diffusers folder or "
                    ".safetensors file, or a Hub id (owner/name)",
                )
                lora_controls = []
                with gr.Accordion("LoRAs", open=False):
                    for j in range(LORA_SLOTS):
                        with gr.Row():
                            lora_controls.append(
                                gr.Dropdown(
                                    [None, *loras],
                                    value=None,
                                    allow_custom_value=True,
                                    label=f"LoRA {j + 1}",
                                    scale=3,
                                )
                            )
                            lora_controls.append(
                                gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", scale=2)
                            )
                prompt = gr.Textbox("a red circle", label="Prompt", lines=2)
                negative = gr.Textbox("", label="Negative prompt")
                with gr.Row():
                    scheduler = gr.Dropdown(SAMPLER_CHOICES, value="euler", label="Sampler")
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    cfg = gr.Slider(0, 20, value=5.0, step=0.5, label="CFG scale")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=2**32 - 1)
                    dice = gr.Button("Random", scale=0, min_width=80)
                    count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
                with gr.Row():
                    width = gr.Slider(0, 2048, value=0, step=8, label="Width (0 = model's own)")
                    height = gr.Slider(0, 2048, value=0, step=8, label="Height (0 = model's own)")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    halt = gr.Button("Stop", variant="stop")
            with gr.Column(scale=6):
                gallery = gr.Gallery(
                    label="Results", format="png", columns=4, height="auto", object_fit="contain"
                )
                status = gr.Markdown("")
                dropped = gr.Image(
                    type="pil",
                    label="Drop a PNG made here to restore its recipe",
                    sources=["upload"],
                    format="png",
                    height=160,
                )
                with gr.Accordion("Recipe", open=False):
                    recipe_box = gr.Code(language="json", label="Recipe JSON", interactive=True)
                    with gr.Row():
                        show = gr.Button("Show recipe of the controls")
                        apply = gr.Button("Set controls from this recipe")
                        run_json = gr.Button("Generate from this recipe")

        CONTROLS[:] = [
            method,
            model,
            *lora_controls,
            prompt,
            negative,
            scheduler,
            steps,
            cfg,
            seed,
            width,
            height,
            count,
        ]
        outputs = [gallery, recipe_box, status]
        job = go.click(run_controls, CONTROLS, outputs, api_visibility="undocumented")
        job_json = run_json.click(run_recipe, [recipe_box], outputs, api_name="generate")
        halt.click(stop, None, None, cancels=[job, job_json], queue=False)
        dice.click(lambda: random.randint(0, 2**32 - 1), None, seed, queue=False)
        show.click(current_recipe, CONTROLS, recipe_box, queue=False)
        apply.click(
            restore_from_recipe,
            [recipe_box],
            [*CONTROLS, recipe_box],
            api_visibility="undocumented",
        )
        dropped.upload(
            restore_from_png, [dropped], [*CONTROLS, recipe_box], api_visibility="undocumented"
        )
    return demo


def main() -> None:
    registry.quiet_libraries()
    demo = build()
    demo.queue(default_concurrency_limit=int(os.environ.get("COMPOSER_CONCURRENCY", "1")))
    demo.launch(allowed_paths=[str(OUTPUT_DIR)])


if __name__ == "__main__":
    main()
