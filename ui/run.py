"""The run adapter: a recipe sampled on the GPU the way the host wants it (``spaces.GPU`` on a
ZeroGPU Space, directly elsewhere), with the Stop button's cancel and one error type back.

On a Hugging Face Space with ZeroGPU the sampling runs inside ``spaces.GPU``; elsewhere, or
without the ``spaces`` package, the same function runs as it is.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import gradio as gr

try:
    import spaces  # on ZeroGPU this must come before anything initialises CUDA
except ImportError:
    spaces = None

from composer import engine, registry
from composer.methods import METHODS
from composer.recipe import Recipe, RecipeError

log = logging.getLogger("composer.app")
CANCEL: dict[str, threading.Event] = {}
"""The Stop button's event per session, looked up by key (a ZeroGPU worker gets the key)."""
STEPS: dict[str, tuple[int, int]] = {}
"""Steps done and to do of the session's running generation, for "Stopped after k of n steps"."""
REMOTE: Callable[..., engine.Result] | None = None
"""Serve mode (``python -m composer serve``): ``ui.serve`` sets this to a function
with ``engine.generate``'s signature that runs the recipe on the Ray Serve ``Composer``
deployment; ``None`` (``python app.py``, a Space) runs it in this process."""

GPU_SECONDS_BASE = 20
"""Loading a checkpoint the worker has not cached yet, decoding latents, returning the images."""
GPU_SECONDS_PER_CALL = 0.1
"""One U-Net step with classifier-free guidance on 512×512 pixels, with a margin: SD 1.5 in fp16
takes a few hundredths of a second on an H100-class GPU, and a ZeroGPU slice is part of one."""
GPU_SECONDS_MAX = 300
"""ZeroGPU refuses a larger ask outright ("illegal duration"); its maintainers give 5 minutes as
the most a signed-in visitor may ask for, and the estimates above carry margin."""


def gpu_seconds(recipe: Recipe, *_) -> int:
    """How long a ZeroGPU call for ``recipe`` asks to hold the GPU. ZeroGPU stops a call that
    overruns its ask, refuses an ask larger than the visitor's remaining quota and queues longer
    asks behind shorter ones, so the ask follows the work: U-Net calls (steps × the method's
    U-Net passes × images) scaled by the pixel count (SDXL's 1024² where the recipe leaves the
    size to the model), plus loading, plus what the method does besides sampling (a live
    merge), up to ``GPU_SECONDS_MAX``."""
    method, s = METHODS[recipe.method], recipe.sampler
    pixels = (s.width or 1024) * (s.height or 1024) / 512**2
    calls = s.steps * method.unet_calls(recipe) * s.num_images * pixels
    seconds = GPU_SECONDS_BASE + GPU_SECONDS_PER_CALL * calls + method.extra_seconds(recipe)
    return min(math.ceil(seconds), GPU_SECONDS_MAX)


def on_gpu(fn):
    """``spaces.GPU`` with a duration from ``gpu_seconds`` where the ``spaces`` package is
    installed. It changes nothing unless the Space runs on ZeroGPU (``SPACES_ZERO_GPU``), so the
    same code runs locally, in CI, on a Space with its own GPU or on CPU."""
    return fn if spaces is None else spaces.GPU(fn, duration=gpu_seconds)


@on_gpu
def sample(recipe: Recipe, progress: gr.Progress, cancel_key: str) -> engine.Result:
    """The GPU part of a generation. On ZeroGPU it runs in a forked worker: its arguments and
    result are pickled, so it takes the key of the Stop button's event rather than the event (a
    worker cannot see it, and Stop ends a ZeroGPU call only once it returns), and only
    ``gr.Error`` crosses back with its message, so every failure becomes one here."""

    def report(done: int, total: int) -> None:
        STEPS[cancel_key] = (done, total)
        progress((done, total), desc="Sampling", unit="steps")

    try:
        generate = REMOTE or engine.generate
        return generate(recipe, cancel=CANCEL.get(cancel_key), progress=report)
    except engine.Cancelled:
        raise
    except RecipeError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception as e:  # keep the server up for the next user; the log has the traceback
        log.exception("generation failed")
        raise gr.Error(f"Generation failed: {e.__class__.__name__}: {e}") from None


def preload() -> None:
    """Load the bundled models before the server starts. On ZeroGPU ``spaces`` makes CUDA look
    present in this process, so the cache moves them to "cuda" here, which ZeroGPU packs once and
    hands to every GPU worker it forks; a model first loaded inside a GPU call is loaded again by
    each new worker, on that call's time."""
    for name in registry.bundled("models"):
        with registry.CACHE.lease(registry.resolve_model(name)):
            pass
