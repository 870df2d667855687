"""The caller's side of the ``Composer`` deployment: one recipe in, one ``engine.Result`` out,
through a Serve handle, with the same signature and errors as ``engine.generate``.

A request goes out with its model set as the multiplexed id (``wire.model_set``), so Serve's
router sends it to a replica that holds those checkpoints when one is free. A replica that dies
mid-request (its process killed, its node gone) loses only that attempt: Serve starts a new
replica, and the request is sent again, up to ``RETRIES`` times; a recipe is deterministic, so a
retry makes the same pixels. After that the caller gets a ``ServeError`` saying so, never a
hang on a dead replica.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ray.exceptions import ActorUnavailableError, RayActorError

from composer import engine
from composer.recipe import Recipe, RecipeError
from composer.serve import wire

log = logging.getLogger("composer.serve")
RETRIES = 2
"""Attempts after the first when a replica dies under a request (a replacement can die too)."""
LOST = (RayActorError, ActorUnavailableError)
"""What a handle raises when the replica running the request is gone."""


class ServeError(RuntimeError):
    """The deployment could not answer: its replicas kept dying, or the run itself failed."""


@dataclass
class Served:
    """One answered request: the result, the replica that made it, whether that replica held
    the request's model set already (a multiplex hit) and how many attempts it took."""

    result: engine.Result
    replica: str
    hit: bool
    attempts: int


def call(
    handle,
    recipe: Recipe,
    progress: engine.Progress | None = None,
    cancel: threading.Event | None = None,
) -> Served:
    """Run ``recipe`` on the deployment behind ``handle`` (a ``DeploymentHandle`` of
    ``Composer``). Raises ``RecipeError``, ``engine.Cancelled`` or ``ServeError``."""
    text, model_id = recipe.to_json(indent=None), wire.model_set(recipe)
    for attempt in range(1, RETRIES + 2):
        stream = handle.options(multiplexed_model_id=model_id, stream=True).generate.remote(text)
        try:
            return _answer(stream, progress, cancel, attempt)
        except LOST as e:
            lost = e
            log.warning("a Composer replica died under a request (attempt %d): %s", attempt, e)
    raise ServeError(
        f"a Composer replica died under this request {RETRIES + 1} times "
        f"({lost.__class__.__name__}); the server may be short of memory: try again later"
    )


def _answer(stream, progress, cancel, attempt: int) -> Served:
    replica, hit = "", False
    for event in stream:
        if cancel is not None and cancel.is_set():
            stream.cancel()
            raise engine.Cancelled([])
        if "replica" in event:
            replica, hit = event["replica"], event["hit"]
        elif "step" in event:
            if progress is not None:
                progress(*event["step"])
        elif "result" in event:
            return Served(wire.unpack(event["result"]), replica, hit, attempt)
        elif "refused" in event:
            raise RecipeError(event["refused"])
        elif "cancelled" in event:
            raise engine.Cancelled([])
        elif "failed" in event:
            raise ServeError(event["failed"])
    raise ServeError("the Composer replica ended the request without an answer")


def remote(handle) -> Callable[..., engine.Result]:
    """``engine.generate`` run by the deployment behind ``handle``: what the page calls in serve
    mode (``ui.run.REMOTE``). A per-process cache makes no sense there, so it takes none."""

    def generate(
        recipe: Recipe,
        progress: engine.Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> engine.Result:
        return call(handle, recipe, progress, cancel).result

    return generate
