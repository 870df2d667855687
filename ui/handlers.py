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
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
from gradio import route_utils

from composer import engine, registry
from composer.recipe import Recipe, RecipeError, parse
from composer.sharing.links import decode_recipe, recipe_link, share_link
from composer.sharing.pnginfo import not_carried, png_bytes, read_recipe
from composer.sharing.store import Store
from ui import form, run, views

log = logging.getLogger("composer.app")
OUTPUT_DIR = Path(tempfile.gettempdir()) / "composer-outputs"
OUTPUT_KEEP_S = float(os.environ.get("COMPOSER_OUTPUT_KEEP_S", 24 * 3600))
"""How long a generation's PNGs stay in ``OUTPUT_DIR`` (a day): long enough to download them
from the gallery, short enough that a busy Space's disk does not fill. Share links keep what
they need in the share store, not here."""
OUTPUT_KEEP_FOLDERS = int(os.environ.get("COMPOSER_OUTPUT_KEEP_FOLDERS", 2000))
"""At most this many generations' folders stay, newest first, whatever their age."""
_swept = [0.0]
RESULTS = ("gallery", "recipe_box", "status", "kappas", "plot", "last")
"""What a generation updates, in the order of the ``generate`` API endpoint's outputs."""
ASK_FACTOR = 16
"""Sizes above this many times a model's own pixels ask for confirmation on the page (the
"Allow large sizes" box): a toy model drawn at 2048² (4,096× its 32²) takes minutes per step on
a CPU, and nothing in the picture gets better."""
MAX_FACTOR = 1024
"""Sizes above this many times a model's own pixels are refused on the page, ticked or not: a
single attention call at that size runs for minutes where Stop cannot reach it (the CLI and
Python API do not refuse them)."""


def rows_shown(method: str, shown: int) -> dict:
    """Row k of ``method``'s tab visible for k < ``shown``."""
    rows = form.forms()[method].rows
    return {f"{method}.row{k}": gr.update(visible=k < shown) for k in range(rows)}


def run_recipe(
    recipe_json: str, allow_large: bool = False, progress=None, request: gr.Request | None = None
) -> dict:
    """Generate from recipe JSON: the gallery, the recipe as run, a status line, the per-image
    traces for the κ plot or the maps (page state), the κ plot of the first image and what
    Share stores (session state). A mistake is a ``gr.Error`` (the page shows it in the status
    line, ``ui.page``). A size above ``ASK_FACTOR`` × the model's pixels runs only with
    ``allow_large``, and never above ``MAX_FACTOR``."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    too_large = size_refusal(recipe, allow_large)
    if too_large:
        raise gr.Error(too_large, print_exception=False)
    key = request.session_hash if request is not None else uuid.uuid4().hex
    if key not in run.CANCEL:  # ``arm`` made one when the button was clicked
        run.CANCEL[key] = threading.Event()
    try:
        if run.CANCEL[key].is_set():  # Stop pressed while the request waited in the queue
            raise engine.Cancelled([])
        result = run.sample(recipe, progress or (lambda *a, **k: None), key)
    except engine.Cancelled as e:
        return stopped(recipe, run.STEPS.get(key, (0, 0))[0], len(e.images))
    finally:
        run.CANCEL.pop(key, None)
        run.STEPS.pop(key, None)
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
    if not recipe.prompt.strip() and all(not e.prompt for e in recipe.experts):
        status += "; the prompt was empty, so these are the models' unconditional drawings"
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


def stopped(recipe: Recipe, done: int, finished: int) -> dict:
    """What Stop leaves on the page: how far the run got, and nothing half made."""
    s = recipe.sampler
    status = f"Stopped after {done} of {s.steps * s.num_images} steps"
    if finished:
        status += f" ({finished} of {s.num_images} image(s) were finished, not kept)"
    status += "."
    gr.Info(status)
    return {
        "gallery": [],
        "recipe_box": recipe.to_json(),
        "status": status,
        "kappas": None,
        "plot": gr.update(visible=False),
        "last": None,
    }


def native_side(reference: str) -> tuple[int, int] | None:
    """A diffusers folder's native width and height from its configs (U-Net sample size × the
    VAE's downsampling), without loading it; ``None`` where the configs are not at hand (a
    single file, a Hub id not yet downloaded)."""
    try:
        folder = Path(registry.resolve_model(reference).location)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (RecipeError, OSError, ValueError):
        return None
    sample = unet.get("sample_size")
    side = sample if isinstance(sample, int) else (sample or [0])[0]
    return (side * 2 ** (len(vae.get("block_out_channels", [0])) - 1),) * 2


def size_refusal(recipe: Recipe, allow_large: bool) -> str:
    """Why the page will not run ``recipe`` at its size ("" when it will): its pixels against
    the largest native size among its experts, with the factor."""
    s = recipe.sampler
    if not (s.width or s.height):
        return ""
    known = {e.model: native_side(e.model) for e in recipe.experts}
    known = {model: side for model, side in known.items() if side is not None}
    if not known:
        return ""
    model = max(known, key=lambda m: known[m][0] * known[m][1])
    nw, nh = known[model]
    width, height = s.width or nw, s.height or nh
    factor = width * height / (nw * nh)
    if factor <= ASK_FACTOR:
        return ""
    said = f"{width}×{height} is {factor:,.0f}× the pixels of {model}'s own {nw}×{nh}"
    if factor > MAX_FACTOR:
        return f"{said}; the page runs at most {MAX_FACTOR:,}× (use the command line for more)."
    if allow_large:
        return ""
    return (
        f"{said}; each step costs about that many times more. Tick “Allow large sizes” to run "
        f"it anyway (up to {MAX_FACTOR:,}×)."
    )


def run_controls(values: dict, allow_large: bool = False, progress=None,
                 request: gr.Request | None = None) -> dict:  # fmt: skip
    return run_recipe(json.dumps(form.to_recipe(values)), allow_large, progress, request)


def arm(session_hash: str) -> None:
    """A fresh Stop event for the session's next run, made when its button is clicked (before
    the run waits in the queue), so that Stop also stops a run that has not started yet."""
    run.CANCEL[session_hash] = threading.Event()


def stop(session_hash: str) -> None:
    event = run.CANCEL.get(session_hash)
    if event is not None:
        event.set()


def write_pngs(pngs: list[bytes]) -> list[str]:
    """PNG files in a fresh folder under ``OUTPUT_DIR``, the one place the page serves files from
    (the share store's own folder is never served)."""
    sweep_outputs()
    folder = OUTPUT_DIR / uuid.uuid4().hex
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pngs):
        path = folder / f"{i:05d}.png"
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def sweep_outputs(now: float | None = None, every_s: float = 60.0) -> int:
    """Remove generations' folders older than ``OUTPUT_KEEP_S`` and beyond the newest
    ``OUTPUT_KEEP_FOLDERS`` (at most once per ``every_s``); returns how many went. A folder
    another request is writing into is young, so it stays."""
    now = time.time() if now is None else now
    if now - _swept[0] < every_s:
        return 0
    _swept[0] = now
    try:
        folders = sorted(
            ((f.stat().st_mtime, f) for f in OUTPUT_DIR.iterdir() if f.is_dir()), reverse=True
        )
    except OSError:  # no outputs yet
        return 0
    gone = 0
    for k, (mtime, folder) in enumerate(folders):
        if k >= OUTPUT_KEEP_FOLDERS or now - mtime > OUTPUT_KEEP_S:
            shutil.rmtree(folder, ignore_errors=True)
            gone += 1
    return gone


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


def link_recipe(recipe_json: str, request: gr.Request | None = None) -> str:
    """The ``link_recipe`` API endpoint (an MCP tool): the ``?recipe=`` link of a recipe, which
    opens this page with its controls set and makes the same images on Re-run. It stores
    nothing, so it needs no session: what an assistant shares after ``generate``."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
        return recipe_link(page_url(request), recipe)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None


def restore(recipe: Recipe) -> dict:
    """Updates that show ``recipe``: its controls, its tab and rows, the Recipe panel. A recipe
    the controls cannot show (more experts or LoRAs than the page has rows for, a method without
    a tab) goes to the Recipe panel only, from where it can be run as it is."""
    values = form.from_recipe(recipe)
    if values is None:
        status = (
            f"This recipe (method {recipe.method!r}, {len(recipe.experts)} expert(s)) is more "
            "than the controls show: it is in the Recipe panel, from where “Generate from this "
            "recipe” runs it."
        )
        gr.Info(status)
        return {"recipe_box": recipe.to_json(), "status": status}
    shown = values.get(f"{recipe.method}.shown", form.forms()[recipe.method].rows)
    return {
        **values,
        "recipe_box": recipe.to_json(),
        "tabs": gr.update(selected=recipe.method),
        **rows_shown(recipe.method, shown),
    }


def restore_from_recipe(recipe_json: str) -> dict:
    """ "Set controls from this recipe": checked as a run would check it (models, LoRAs and
    aggregators must exist), so that what the controls show can be generated."""
    try:
        recipe = parse(recipe_json, check=registry.check_reference)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return {"status": "Controls set from the Recipe panel.", **restore(recipe)}


def restore_from_png(image) -> dict:
    """A dropped PNG: its recipe in the controls; one that carries none (or a broken one)
    changes nothing and says why."""
    if image is None:
        return {}
    try:
        recipe = read_recipe(image)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    status = "Controls restored from the image's recipe."
    left_out = not_carried(image)
    if left_out:
        status = (
            "Controls restored from the image's AUTOMATIC1111 parameters; not carried over "
            f"(no recipe field holds them): {', '.join(left_out)}."
        )
    if form.fits(recipe):
        gr.Info(status)
    return {"status": status, **restore(recipe)}


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
        done = engine.export(recipe, folder / export_name(recipe), "fp16")
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:
        log.exception("export failed")
        raise gr.Error(f"Export failed: {e.__class__.__name__}: {e}") from None
    gr.Info(f"Merged in {done['seconds']:.1f} s ({done['bytes'] / 2**20:.1f} MiB, fp16).")
    return done["path"]


MAX_GRID_CELLS = 16


def make_grid(values: dict, x_spec: str, y_spec: str = "") -> dict:
    """The Comparison grid panel: the controls' recipe over ``x_spec`` (and ``y_spec``), e.g.
    ``merge.density=0.2,0.5,0.8`` (``composer.grid``); the labelled picture and every cell's
    PNG, each with its own recipe."""
    from composer import grid

    try:
        x = grid.parse_axis(x_spec.strip())
        y = grid.parse_axis(y_spec.strip()) if y_spec and y_spec.strip() else None
        cells = len(x.values) * (len(y.values) if y is not None else 1)
        if cells > MAX_GRID_CELLS:
            raise RecipeError(f"grid: {cells} cells; the page makes at most {MAX_GRID_CELLS}")
        made = grid.run(form.to_recipe(values), x, y)
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    folder = OUTPUT_DIR / uuid.uuid4().hex
    lines = grid.write(made, folder)
    seconds = sum(sum(r.seconds) for line in made.cells for r in line)
    width, height = made.picture.size
    return {
        "grid_picture": lines[-1]["path"],
        "grid_files": [line["path"] for line in lines[:-1]],
        "status": f"Grid of {cells} cells ({width}×{height} px) in {seconds:.1f} s of sampling.",
    }


def export_name(recipe: Recipe) -> str:
    """An exported file's name from its recipe: ``merge-ties-toy-warm-toy-cool.safetensors``."""
    from composer.methods import METHODS

    settings = METHODS[recipe.method].settings(recipe)
    how = getattr(settings, "method", None)
    words = [recipe.method, *([how] if isinstance(how, str) else [])]
    words += [Path(e.model.rstrip("/")).name.removesuffix(".safetensors") for e in recipe.experts]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(words)).strip("-.")
    return f"{name[:120] or 'merged'}.safetensors"


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
