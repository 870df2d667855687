"""The ``Composer`` deployment: each replica runs one recipe at a time on its device and keeps
the model sets it served last loaded (Ray Serve's model multiplexing, keyed by
``wire.model_set``).

Why one request at a time (``max_ongoing_requests=1``): diffusers pipelines are not thread-safe
(diffusers#3672) and one request already fills a GPU; Serve queues the rest and routes each to
a replica that holds its model set when one is free. Each model set gets its own
``registry.ModelCache``, so Ray's per-replica LRU decides what stays loaded, evicting a whole set
at once, and a request's LoRAs live only on that set's pipelines while it holds their lease
(``registry.Lease``): the next request activates exactly its own.

``generate`` streams: first where it runs (``{"replica", "hit"}``), then ``{"step": (done,
total)}`` for the page's progress bar, then one of ``{"result": wire.pack(...)}``,
``{"refused": message}`` (a ``RecipeError``: the user's to fix), ``{"cancelled": images}`` or
``{"failed": message}`` (anything else: the replica stays up for the next request).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig

from composer import engine, registry
from composer.recipe import RecipeError, parse
from composer.serve import wire
from composer.serve.routing import ModelSetRouter

log = logging.getLogger("composer.serve")
MODEL_SETS_PER_REPLICA = 2
"""Model sets a replica keeps loaded (Ray's LRU unloads the oldest beyond this). Two toy sets or
two SD 1.5 sets of three checkpoints (about 12 GB in fp16) fit a 24 GB GPU; two SDXL sets of
three (about 42 GB) want an 80 GB one."""


class ModelSet:
    """One multiplexed model: the pipelines of one model set, in a cache of their own."""

    def __init__(self, model_id: str):
        self.cache = registry.ModelCache(budget_bytes=2**62)  # Ray's LRU is the budget
        for reference in model_id.split("+"):
            with self.cache.lease(registry.resolve_model(reference)):
                pass

    def __del__(self):
        """Called by Ray when its LRU unloads this set: drop the pipelines now, not at the
        next garbage collection, so the replica's memory holds what it says it holds."""
        self.cache.clear()


@serve.deployment(
    name="Composer",
    max_ongoing_requests=1,
    request_router_config=RequestRouterConfig(request_router_class=ModelSetRouter),
)
class Composer:
    def __init__(self):
        registry.quiet_libraries()
        self.loads = 0
        self.name = serve.get_replica_context().replica_id.to_full_id_str()

    @serve.multiplexed(max_num_models_per_replica=MODEL_SETS_PER_REPLICA)
    async def model_set(self, model_id: str) -> ModelSet:
        self.loads += 1
        return await asyncio.to_thread(ModelSet, model_id)

    async def generate(self, recipe_json: str) -> AsyncIterator[dict]:
        """Run one recipe (JSON), streaming the events the module docstring lists."""
        try:
            recipe = parse(recipe_json, check=registry.check_reference)
            loads = self.loads
            models = await self.model_set(serve.get_multiplexed_model_id())
        except RecipeError as e:
            yield {"refused": str(e)}
            return
        yield {"replica": self.name, "hit": self.loads == loads}
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        cancel = threading.Event()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"step": (done, total)})

        run = asyncio.ensure_future(
            asyncio.to_thread(engine.generate, recipe, progress, cancel, models.cache)
        )
        try:
            while not run.done():
                step = asyncio.ensure_future(events.get())
                await asyncio.wait({run, step}, return_when=asyncio.FIRST_COMPLETED)
                if step.done():
                    yield step.result()
                else:
                    step.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield {"result": wire.pack(run.result())}
        except asyncio.CancelledError:  # the client went away: stop the sampler within a block,
            cancel.set()  # and take the next request only once it has
            await asyncio.wait({run})
            raise
        except engine.Cancelled as e:
            yield {"cancelled": len(e.images)}
        except RecipeError as e:
            yield {"refused": str(e)}
        except Exception as e:
            log.exception("generation failed")
            yield {"failed": f"{e.__class__.__name__}: {e}"}
