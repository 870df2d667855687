"""A recipe's images in batches: the loop every method shares.

Image i is drawn from its own generator seeded ``seed + i`` (starting noise and every stochastic
step), as diffusers does with a list of generators, so a batch changes an image only by float
rounding: on this CPU backend image i of a batch of 4 differs from the same seed alone by
≤ 1.4e-5 before 8-bit quantisation, at most 1/255 after (``bench.engine_overhead`` measures
it). So that a re-run is exact, every PNG carries the recipe of the batch it came from (its first
seed, its size) and ``parameters`` says which image of it this is, as AUTOMATIC1111 writes
``Batch size`` and ``Batch pos``; a result's recipe records the batch size it used.

The batch size is the recipe's ``sampler.batch_size`` or, when it gives none, as many images as
half the device's free memory holds by ``activation_bytes``; an out-of-memory error halves it
and tries once more before it becomes a clear error.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from composer.methods.sampling import Cancelled, Job, Result, hashes
from composer.recipe import RecipeError
from composer.sharing.pnginfo import png_info
from composer.speedups import Speedups, attention

ACTIVATION_FACTOR = 24
"""Peak activation bytes of one U-Net pass per latent cell and per channel of the widest block,
per byte of the weights' dtype. Measured with SD1.5-shaped random weights in fp32, no grad, on
this CPU (``python -m bench.engine_overhead --memory``, ``bench/results/engine-overhead-cpu
.json``): one more image in a pass adds 10.1 (256²) and 10.7 (512²) × cells × 1280 × 4 bytes of
resident memory; the first image with the pass's fixed overhead 40.1 (256²) and 12.8 (512²). 24
is twice the marginal cost, so that a batch of a few images still fits with the fixed part and
attention without memory-efficient kernels; ``bench/gpu.sh`` measures the CUDA figure."""
BUDGET_SHARE = 0.5
"""The share of the device's free memory one batch may fill."""
CHECKED_BLOCKS = frozenset(
    {"ResnetBlock2D", "Transformer2DModel", "Attention", "Downsample2D", "Upsample2D"}
)
"""The U-Net and VAE blocks that look at the cancel flag before they run: on an SD1.5 U-Net
about 90 Python calls per pass, so Stop acts within one block's time, not one step's."""


def activation_bytes(pipe, width: int, height: int) -> int:
    """What one image costs in one U-Net pass at ``width`` × ``height``."""
    scale = pipe.vae_scale_factor
    cells = (height // scale) * (width // scale)
    channels = max(pipe.unet.config.block_out_channels)
    return cells * channels * pipe.unet.dtype.itemsize * ACTIVATION_FACTOR


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``; on CUDA also what PyTorch's allocator holds but does not use."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    import psutil

    return psutil.virtual_memory().available


def batch_limit(job: Job, pipe, passes: int) -> int:
    """How many images fit one call: ``passes`` U-Net passes per image and step (experts, and
    CFG's two halves) in ``BUDGET_SHARE`` of the free memory."""
    width, height = job.size(pipe)
    cfg = 2 if job.recipe.sampler.guidance_scale > 1 else 1
    per_image = activation_bytes(pipe, width, height) * passes * cfg
    return max(1, int(free_bytes(pipe.device) * BUDGET_SHARE) // per_image)


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError)
        and any(s in str(error) for s in ("out of memory", "can't allocate memory"))
    )


def each_batch(job: Job, device: str, sample, pipe, passes: int = 1) -> Result:
    """Image i with seed ``seed + i``, in batches; progress over all steps of all images, cancel
    within a step, PNG metadata. ``sample(seeds, on_step)`` makes one batch and returns its
    images and one per-step trace per image; ``on_step`` is a diffusers
    ``callback_on_step_end``. ``pipe`` and ``passes`` size the batch (``batch_limit``)."""
    recipe, progress, cancel = job.recipe, job.progress, job.cancel
    s = recipe.sampler
    n, total = s.num_images, s.steps * s.num_images
    size = s.batch_size or min(n, batch_limit(job, pipe, passes))
    speedups = Speedups.from_env()
    images, seeds, seconds, trace, batches = [], [], [], [], []
    start, retried = 0, False
    while start < n:
        batch = [s.seed + i for i in range(start, min(start + size, n))]
        length = len(batch)

        def on_step(p, step, timestep, kwargs, start=start, length=length):
            if progress is not None:
                progress(start * s.steps + (step + 1) * length, total)
            if cancel is not None and cancel.is_set():
                p._interrupt = True
            return kwargs

        began = time.perf_counter()
        try:
            with attention(speedups), stop_inside(_networks(job, pipe), cancel):
                made, steps = sample(batch, on_step)
        except Cancelled:
            raise Cancelled(images) from None
        except Exception as e:
            if not out_of_memory(e):
                raise
            if retried or size == 1:
                raise _too_big(job, pipe, len(batch), device) from None
            retried, size = True, max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if cancel is not None and cancel.is_set():
            raise Cancelled(images)
        seconds += [(time.perf_counter() - began) / len(batch)] * len(batch)
        images += made
        seeds += batch
        trace += steps
        batches += [(start, len(batch))] * len(batch)
        start += len(batch)
    ran = recipe if n == 1 else replace(recipe, sampler=replace(s, batch_size=size))
    model_hashes, lora_hashes, ti_hashes = hashes(recipe, job.sources, job.embeddings)
    from composer.methods import METHODS

    sampler = METHODS[recipe.method].sampler
    metadata = [
        png_info(
            recipe,
            i,
            model_hashes,
            lora_hashes,
            sampler,
            batch=batches[i],
            ti_hashes=ti_hashes,
            size=images[i].size,
        )
        for i in range(len(images))
    ]
    return Result(ran, images, seeds, seconds, trace, metadata, device, batch_size=size)


def _networks(job: Job, pipe) -> list[torch.nn.Module]:
    """The U-Nets and VAEs one batch may run: ``pipe``'s (a live merge's own) and every leased
    pipeline's (the experts of superposition and aggregation)."""
    pipes = [pipe, *(lease.pipe for lease in job.leases.values())]
    nets = [getattr(p, name, None) for p in pipes for name in ("unet", "vae")]
    return list({id(n): n for n in nets if isinstance(n, torch.nn.Module)}.values())


@contextmanager
def stop_inside(networks: list[torch.nn.Module], cancel: threading.Event | None):
    """Stop inside a pass, not only between steps: while the batch runs, a forward pre-hook on
    each of ``networks``' ``CHECKED_BLOCKS`` raises ``Cancelled`` once ``cancel`` is set (one
    step of a large image can take minutes on a CPU). The hooks are this request's and are
    removed when the batch ends; the request's lease keeps other requests off these modules
    meanwhile. A compiled network (``COMPOSER_COMPILE``) is left alone: a new hook would make
    ``torch.compile`` trace it again, so there Stop acts between steps."""
    if cancel is None:
        yield
        return

    def check(module, args):
        if cancel.is_set():
            raise Cancelled([])

    handles = [
        block.register_forward_pre_hook(check)
        for net in networks
        if getattr(net, "_compiled_call_impl", None) is None
        for block in net.modules()
        if type(block).__name__ in CHECKED_BLOCKS
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _too_big(job: Job, pipe, length: int, device: str) -> RecipeError:
    width, height = job.size(pipe)
    return RecipeError(
        f"sampler: out of memory with {length} image(s) of {width}×{height} in one batch on "
        f"{device}, after halving the batch once; ask for a smaller sampler.batch_size, a smaller "
        "size or fewer experts"
    )
