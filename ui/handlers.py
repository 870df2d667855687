"""What the page's events do, as functions of names: each takes control values by name
(``ui.form``) and returns updates by name, so it can be called and tested without a built page;
``ui.page`` connects the names to the Gradio components.

Every action goes through a recipe: the controls are turned into recipe JSON, parsed by
``composer.recipe.parse`` (the one validation) and run by ``composer.engine``; a dropped PNG, a
pasted recipe or a shared link (``?id=`` from ``composer.sharing.store``, ``?recipe=`` from
``composer.sharing.links``) is parsed the same way and written back into the controls.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path

import gradio as gr
from gradio import route_utils

from composer import engine, registry
from composer.recipe import Recipe, RecipeError, parse
from composer.sharing.links import decode_recipe, recipe_link, share_link
from composer.sharing.pnginfo import png_bytes, read_recipe
from composer.sharing.store import Store
from ui import form, run, views

log = logging.getLogger("composer.app")
OUTPUT_DIR = Path(tempfile.gettempdir()) / "composer-outputs"
RESULTS = ("gallery", "recipe_box", "status", "kappas", "plot", "last")
"""What a generation updates, in the order of the ``generate`` API endpoint's outputs."""


def rows_shown(method: str, shown: int) -> dict:
    """Row k of ``method``'s tab visible for k < ``shown``."""
    rows = form.forms()[method].rows
    return {f"{method}.row{k}": gr.update(visible=k < shown) for k in range(rows)}


def run_recipe(recipe_json: str, progress=None, request: gr.Request | None = None) -> dict:
    """Generate from recipe JSON: the gallery, the recipe as run, a status line, the per-image
    traces for the κ plot or the maps (page state), the κ plot of the first image and what
    Share stores (session state)."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    key = request.session_hash if request is not None else uuid.uuid4().hex
    run.CANCEL[key] = threading.Event()
    try:
        result = run.sample(recipe, progress or (lambda *a, **k: None), key)
    except engine.Cancelled as e:
        gr.Info(f"Stopped; {len(e.images)} image(s) were finished.")
        return dict(zip(RESULTS, ([], recipe.to_json(), "Stopped.", None,
                                  gr.update(visible=False), None), strict=True))  # fmt: skip
    finally:
        run.CANCEL.pop(key, None)
    paths = write_pngs(
        [png_bytes(image, info) for image, info in zip(result.images, result.metadata, strict=True)]
    )
    count = len(result.images)
    batching = (
        ""
        if count <= 1
        else " in one batch"
        if result.batch_size >= count
        else f" in batches of {result.batch_size}"
    )
    status = (
        f"{count} image(s){batching}, {sum(result.seconds):.2f} s on {result.device} "
        f"({sum(result.seconds) / max(len(result.images), 1):.2f} s per image)"
    )
    recipe = result.recipe  # with the batch size it used, so that Re-run makes the same batches
    kappas = views.traces(recipe, result, paths)
    return {
        "gallery": gallery_items(paths, recipe),
        "recipe_box": recipe.to_json(),
        "status": status,
        "kappas": kappas,
        "plot": views.kappa_plot(kappas, 0),
        "last": {"recipe": recipe.to_json(indent=None), "paths": paths},
    }


def run_controls(values: dict, progress=None, request: gr.Request | None = None) -> dict:
    return run_recipe(json.dumps(form.to_recipe(values)), progress, request)


def stop(session_hash: str) -> None:
    event = run.CANCEL.get(session_hash)
    if event is not None:
        event.set()


def write_pngs(pngs: list[bytes]) -> list[str]:
    """PNG files in a fresh folder under ``OUTPUT_DIR``, the one place the page serves files from
    (the share store's own folder is never served)."""
    folder = OUTPUT_DIR / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pngs):
        path = folder / f"{i:05d}.png"
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def gallery_items(paths: list[str], recipe: Recipe) -> list[tuple[str, str]]:
    return [(path, f"seed {recipe.sampler.seed + i}") for i, path in enumerate(paths)]


def page_url(request: gr.Request | None) -> str:
    """Where links point. On a Space: its page on huggingface.co, which passes ``?id=`` and
    ``?recipe=`` on to the app when it loads (the app's own address is an iframe's). Elsewhere:
    the address this request reached the server at, proxy headers resolved as Gradio does."""
    space = os.environ.get("SPACE_ID")
    if space:
        return f"https://huggingface.co/spaces/{space}"
    raw = getattr(request, "request", None)
    if raw is None:
        return ""
    try:
        route = route_utils.get_api_call_path(raw)
    except ValueError:  # an event outside the queue
        route = ""
    return route_utils.get_root_url(raw, route, None)


def share(last: dict | None, listed: bool = False, request: gr.Request | None = None):
    """The Share button and the ``share`` API endpoint: store this session's last generation
    (the recipe it ran and the PNGs this server wrote, never files a client sends) and return its
    ``?id=`` link and the stateless ``?recipe=`` link ("" when the recipe is too long for one)."""
    if not last:
        raise gr.Error("Nothing to share yet: generate first, then press Share.")
    base = page_url(request)
    try:
        pngs = [Path(path).read_bytes() for path in last["paths"]]
    except OSError:
        raise gr.Error(
            "The images of the last generation are no longer on the server; generate again."
        ) from None
    try:
        share_id = Store().save(last["recipe"], pngs, listed=bool(listed))
        recipe = parse(last["recipe"])
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    try:
        stateless = recipe_link(base, recipe)
    except RecipeError as e:
        gr.Info(str(e))
        stateless = ""
    return share_link(base, share_id), stateless


def restore(recipe: Recipe) -> dict:
    """Updates that show ``recipe``: its controls, its tab and rows, the Recipe panel. A recipe
    the controls cannot show (more experts or LoRAs than the page has rows for, a method without
    a tab) goes to the Recipe panel only, from where it can be run as it is."""
    values = form.from_recipe(recipe)
    if values is None:
        gr.Info(
            f"This recipe (method {recipe.method!r}, {len(recipe.experts)} expert(s)) is more "
            "than the controls show: it is in the Recipe panel, from where “Generate from this "
            "recipe” runs it."
        )
        return {"recipe_box": recipe.to_json()}
    shown = values.get(f"{recipe.method}.shown", form.forms()[recipe.method].rows)
    return {
        **values,
        "recipe_box": recipe.to_json(),
        "tabs": gr.update(selected=recipe.method),
        **rows_shown(recipe.method, shown),
    }


def restore_from_recipe(recipe_json: str) -> dict:
    try:
        recipe = parse(recipe_json)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return restore(recipe)


def restore_from_png(image) -> dict:
    if image is None:
        return {}
    try:
        recipe = read_recipe(image)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    if form.fits(recipe):
        gr.Info("Controls restored from the image's recipe.")
    return restore(recipe)


def open_link(query: dict) -> dict:
    """Page load: ``?id=`` shows a stored generation, ``?recipe=`` sets the controls from a
    stateless link; a link that cannot be opened says why in the status line."""
    if "id" in query:
        return open_entry(query["id"])
    if "recipe" not in query:
        return {}
    try:
        recipe = decode_recipe(query["recipe"])
    except RecipeError as e:
        return cannot_open(e)
    status = "Controls set from the link's recipe; **Re-run** makes its images."
    return {
        **restore(recipe),
        "status": status,
        "last": None,
        "rerun_recipe": recipe.to_json(),
        "rerun": gr.update(visible=True),
    }


def open_entry(share_id: str) -> dict:
    """A stored generation on the page: its recipe in the controls, its images as they were
    made (not made again) and Re-run, which makes them again from the recipe."""
    try:
        entry = Store().open(share_id)
    except RecipeError as e:
        return cannot_open(e)
    paths = write_pngs(list(entry.pngs))
    status = (
        f"Shared generation `{entry.id}`: {len(paths)} image(s) as they were made. "
        "**Re-run** makes them again from the recipe."
    )
    return {
        **restore(entry.recipe),
        "gallery": gallery_items(paths, entry.recipe),
        "status": status,
        "last": {"recipe": entry.recipe.to_json(indent=None), "paths": paths},
        "rerun_recipe": entry.recipe.to_json(),
        "rerun": gr.update(visible=True),
    }


def cannot_open(error: RecipeError) -> dict:
    return {
        "status": f"This link cannot be opened: {error}",
        "last": None,
        "rerun_recipe": None,
        "rerun": gr.update(visible=False),
    }


def list_shared():
    """The Shared panel: the first image of each of the latest generations shared with "list
    it"; an entry that no longer opens is left out."""
    shares = Store()
    items, ids = [], []
    for share_id in shares.latest():
        try:
            entry = shares.open(share_id)
        except RecipeError:
            continue
        (path,) = write_pngs([entry.pngs[0]])
        items.append((path, f"{entry.recipe.method}: {entry.recipe.prompt[:60]}"))
        ids.append(share_id)
    return items, ids


def export(values: dict, progress=None) -> str:
    """A tab's Export button: the model its recipe samples as one fp16 ``.safetensors`` file."""
    try:
        recipe = parse(json.dumps(form.to_recipe(values)), check=registry.check_reference)
        folder = OUTPUT_DIR / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        if progress is not None:
            progress(0, desc="Merging and writing")
        done = engine.export(recipe, folder / "merged.safetensors", "fp16")
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        log.exception("export failed")
        raise gr.Error(f"Export failed: {e.__class__.__name__}: {e}") from None
    gr.Info(f"Merged in {done['seconds']:.1f} s ({done['bytes'] / 2**20:.1f} MiB, fp16).")
    return done["path"]


def current_recipe(values: dict) -> str:
    return json.dumps(form.to_recipe(values), indent=2)


def change_rows(method: str, shown: int, delta: int) -> dict:
    rows = form.forms()[method].rows
    shown = max(2, min(rows, int(shown) + delta))
    return {f"{method}.shown": shown, **rows_shown(method, shown)}


def fill_rows(method: str, models: list[str], shown: int) -> dict:
    """Picking an aggregator puts the experts it was trained for into the rows, in order."""
    rows = form.forms()[method].rows
    if not 2 <= len(models) <= rows:
        return {}
    return {
        f"{method}.shown": len(models),
        **rows_shown(method, len(models)),
        **{f"{method}.{k}.model": model for k, model in enumerate(models)},
    }
