"""Resolved references (``composer.references``) → loaded diffusers pipelines, LoRA adapters,
aggregators and routers, with one process-wide cache.

The cache holds whole pipelines keyed by resolved location, evicts the least recently used when a
memory budget (``COMPOSER_CACHE_GB``, default 12) is exceeded, and hands each request a
``Lease``: the pipeline plus a lock that the request holds while it sets its own LoRA adapters and
samples, so that two requests on one cached model never see each other's adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from composer import speedups
from composer.checkpoints import single_file, validate
from composer.device import pick_device
from composer.recipe import RecipeError
from composer.references import (  # noqa: F401  (re-exported: callers use registry.X)
    DEFAULT_MODEL,
    LORA_FILE,
    PICKLE_SUFFIXES,
    Source,
    check_reference,
    pickle_allowed,
    resolve_aggregator,
    resolve_embedding,
    resolve_lora,
    resolve_model,
    resolve_router,
)
from composer.zoo import ASSETS as ASSETS  # the bundled zoo, for callers of registry.ASSETS
from composer.zoo import bundled

MAX_ADAPTERS = 8


def load_router(path: str, device: torch.device):
    """A superposition router folder (``config.json`` + safetensors weights), fp32 on
    ``device``; cached like aggregators."""
    from pipelines.superposition.router import Router

    return _load_trained(Router, path, device, torch.float32, "superpose.router", "a router")


def load_aggregator(path: str, device: torch.device, dtype: torch.dtype):
    """An AFA aggregator folder (``config.json`` + safetensors weights) on ``device``; cached by
    (path, modification time, device, dtype). It is only read while sampling, so requests share it.
    """
    from pipelines.aggregation import Aggregator

    return _load_trained(Aggregator, path, device, dtype, "aggregate.aggregator", "an aggregator")


def _load_trained(cls, path: str, device: torch.device, dtype: torch.dtype, where: str, what: str):
    weights = Path(path) / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise RecipeError(f"{where}: {path!r} holds no diffusion_pytorch_model.safetensors")
    stamp = weights.stat().st_mtime_ns
    key = (cls.__name__, str(Path(path).resolve()), stamp, str(device), str(dtype))
    with LOADING:
        if key not in _TRAINED:
            try:
                model = cls.from_pretrained(path, use_safetensors=True)
            except (OSError, ValueError, RuntimeError, TypeError) as e:
                reason = _first_line(str(e))
                raise RecipeError(f"{where}: {path!r} is not {what}: {reason}") from None
            for other in [k for k in _TRAINED if k[0] == cls.__name__]:
                del _TRAINED[other]  # one of each kind stays loaded
            _TRAINED[key] = model.to(device=device, dtype=dtype).eval()
        return _TRAINED[key]


_TRAINED: dict[tuple, object] = {}

LOADING = threading.RLock()
"""Held while weights load (pipelines, LoRAs, aggregators). Loading patches global state:
diffusers and accelerate create modules on the ``meta`` device by patching
``nn.Module.register_parameter``, transformers marks parameters ``_is_hf_initialized``; two loads
at once corrupt each other ("Tensor on device meta is not on the expected device", issue 20), so
requests may sample in parallel but load one at a time."""


# --- architectures -----------------------------------------------------------------------------


def architecture(pipe) -> str:
    """``sd1``, ``sd2`` or ``sdxl``: what decides whether latents and weights are compatible."""
    unet = pipe.unet.config
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def latent_signature(pipe) -> tuple:
    """Two pipelines share a latent space when their VAEs have this same signature."""
    vae = pipe.vae.config
    return (vae.latent_channels, tuple(vae.block_out_channels), round(vae.scaling_factor, 6))


# --- loading -------------------------------------------------------------------------------------


def _pipeline_class(source: Source):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if source.kind == "single_file":
        if not source.location.endswith(".safetensors"):
            return StableDiffusionPipeline  # an allowed pickle file: no cheap look inside
        with safe_open(source.location, framework="pt") as f:
            keys = f.keys()
        return StableDiffusionXLPipeline if single_file.is_sdxl(keys) else StableDiffusionPipeline
    if source.kind == "hub":
        return DiffusionPipeline
    index = json.loads((Path(source.location) / "model_index.json").read_text())
    return (
        StableDiffusionXLPipeline
        if "XL" in index.get("_class_name", "")
        else StableDiffusionPipeline
    )


def single_file_config(source: Source) -> str | None:
    """The diffusers folder whose configs a single-file checkpoint is read with, offline
    (``single_file.config_folder``)."""
    return single_file.config_folder(source.location, bundled("models"))


def load_pipeline(source: Source, device: torch.device, dtype: torch.dtype):
    """Load a pipeline from ``source`` onto ``device``; every failure becomes a ``RecipeError``."""
    cls = _pipeline_class(source)
    safetensors_only = not pickle_allowed()
    common = {"dtype": dtype}
    if cls.__name__ == "StableDiffusionPipeline":
        common.update(safety_checker=None, requires_safety_checker=False)
    config = single_file_config(source) if source.kind == "single_file" else None
    try:
        if source.kind == "single_file":
            pipe = cls.from_single_file(
                source.location, config=config, local_files_only=config is not None, **common
            )
        else:
            pipe = cls.from_pretrained(
                source.location,
                use_safetensors=True if safetensors_only else None,
                local_files_only=source.kind != "hub",
                **common,
            )
    except OSError as e:
        text = str(e)
        if source.kind == "single_file" and config is None:
            raise RecipeError(
                f"model {source.reference!r}: reading a single-file checkpoint needs the configs "
                "of its architecture; with no network, set COMPOSER_SINGLE_FILE_CONFIG to a "
                f"diffusers folder of the same architecture ({_first_line(text)})"
            ) from None
        if source.kind == "hub":
            raise RecipeError(
                f"model {source.reference!r}: could not be loaded from the Hugging Face Hub "
                "(no network, a private or gated repository, or no such repository): "
                + _first_line(text)
            ) from None
        if "safetensors" in text.lower() and safetensors_only:
            raise RecipeError(
                f"model {source.reference!r}: has no .safetensors weights; pickle weights are "
                "refused unless COMPOSER_ALLOW_PICKLE=1"
            ) from None
        raise RecipeError(
            f"model {source.reference!r}: could not be loaded: {_first_line(text)}"
        ) from None
    except Exception as e:
        # every library error is the file's: diffusers' SingleFileComponentError (metadata or
        # unrelated keys only), a config naming a class that does not exist (TypeError,
        # ModuleNotFoundError), a header that lies about its tensors; a tensor of the wrong
        # shape is named as the file names it (checked only now: it costs nothing when loading
        # succeeds)
        if config is not None and source.location.endswith(".safetensors"):
            try:
                single_file.check_shapes(source.location, config)
            except validate.WeightsError as bad:
                raise RecipeError(f"model {source.reference!r}: {bad}") from None
        raise RecipeError(
            f"model {source.reference!r}: could not be loaded: "
            f"{_first_line(str(e)) or type(e).__name__}"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe if device.type == "cpu" else pipe.to(device)
    _check_loaded(pipe, source)
    try:
        speedups.prepare(pipe, speedups.Speedups.from_env())
    except ValueError as e:
        raise RecipeError(f"model {source.reference!r}: {e}") from None
    return pipe


def _check_loaded(pipe, source: Source) -> None:
    """Weights validated once, where they now lie (``checkpoints.validate``): every tensor
    finite; a single file's scheduler told whether it predicts v (``single_file``)."""
    files = [] if source.kind == "hub" else validate.weight_files(source.location)
    try:
        validate.check_pipeline(pipe, files)
    except validate.WeightsError as e:
        raise RecipeError(f"model {source.reference!r}: {e}") from None
    if source.kind == "single_file" and source.location.endswith(".safetensors"):
        single_file.set_prediction(pipe, source.location)


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' progress bars and advice for the CLI and the page,
    where they would bury our own messages; a library user keeps their defaults."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) < 300 else line[:297] + "..."


def pipeline_bytes(pipe) -> int:
    total = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


class Lease:
    """One request's hold on a cached pipeline: activate this request's LoRAs, then sample."""

    def __init__(self, entry: _Entry):
        self.entry = entry
        self.pipe = entry.pipe

    def use_loras(self, loras: list[tuple[str, float]]) -> None:
        """Make exactly ``loras`` (resolved path or Hub id, strength) active on the pipeline.

        Adapters stay loaded between requests (loading is the slow part), under names derived from
        the file, and are switched with ``set_adapters``; an adapter not named here is inactive.
        """
        pipe = self.pipe
        if not loras:
            if self.entry.adapters:
                pipe.disable_lora()
            return
        adapters = self.load_loras(loras)
        try:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
        except Exception as e:  # a header that loaded but cannot be switched on: never again
            for path, _ in loras:
                self._forget(path)
            raise RecipeError(
                f"LoRA could not be applied to this model: {_first_line(str(e))}"
            ) from None

    def load_loras(
        self, loras: list[tuple[str, float]], keep: set[str] = frozenset()
    ) -> tuple[tuple[str, float], ...]:
        """Load ``loras`` as adapters (if not loaded yet) without changing which are active;
        returns their (adapter name, weight) pairs. Making room never unloads ``keep``.

        Each file is read, checked and placed on this model's weights by ``lora_adapters``
        first (the reader merges use): one that does not fit is refused before anything loads.
        """
        from composer.lora_adapters import adapter_for

        out = []
        for path, strength in loras:
            dora_key = f"{path}@{float(strength)!r}"
            if path in self.entry.adapters:
                out.append((self.entry.adapters[path], float(strength)))
                continue
            if dora_key in self.entry.adapters:
                out.append((self.entry.adapters[dora_key], 1.0))
                continue
            self._make_room(keep={p for p, _ in loras} | set(keep))
            name = f"lora_{len(self.entry.adapters)}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
            try:
                with LOADING, warnings.catch_warnings():
                    adapter = adapter_for(self.pipe, path, float(strength))
                    if adapter.key != path:
                        name += f"_{hashlib.sha1(adapter.key.encode()).hexdigest()[:6]}"
                    # peft warns on every adapter after the first; several are the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    self.pipe.load_lora_weights(
                        adapter.source,
                        adapter_name=name,
                        use_safetensors=True if not pickle_allowed() else None,
                    )
            except Exception as e:  # whatever the library says, half an adapter stays not
                self._forget(path, name)
                reason = _first_line(str(e))
                if reason.startswith(path + ": "):  # our reader's message names the file
                    reason = reason[len(path) + 2 :]
                raise RecipeError(
                    f"LoRA {path!r} could not be applied to this model: {reason}"
                ) from None
            self.entry.adapters[adapter.key] = name
            out.append((name, adapter.weight))
        return tuple(out)

    def _forget(self, path: str, name: str | None = None) -> None:
        """Unload ``path``'s adapter (or the half-loaded ``name``) so that a failure leaves
        nothing behind in the cached pipeline and the next request tries afresh."""
        keys = [k for k in self.entry.adapters if k == path or k.startswith(path + "@")]
        for each in {self.entry.adapters.pop(k) for k in keys} | ({name} if name else set()):
            with suppress(Exception):  # never loaded far enough to be deleted: nothing to forget
                self.pipe.delete_adapters(each)

    def _make_room(self, keep: set[str]) -> None:
        """Delete the oldest loaded adapters beyond ``MAX_ADAPTERS`` (repeated LoRA swaps grow
        memory otherwise: diffusers#8532, peft#1639)."""
        for path in list(self.entry.adapters):
            if len(self.entry.adapters) < MAX_ADAPTERS:
                break
            if path not in keep and path.rpartition("@")[0] not in keep:
                self.pipe.delete_adapters(self.entry.adapters.pop(path))


@dataclass
class _Entry:
    pipe: object
    nbytes: int
    lock: threading.Lock
    adapters: dict


class ModelCache:
    """Loaded pipelines by resolved location; least recently used evicted over the budget."""

    def __init__(self, budget_bytes: int | None = None):
        gb = float(os.environ.get("COMPOSER_CACHE_GB", "12"))
        self.budget = budget_bytes if budget_bytes is not None else int(gb * 2**30)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def __contains__(self, location: str) -> bool:
        return location in self._entries

    @contextmanager
    def lease(self, source: Source, device: str | None = None) -> Iterator[Lease]:
        """Hold the cached pipeline for ``source`` (loading it if needed) for one request; on
        ``device`` (``cuda:1``) when a placement asks for one, else on the default device."""
        entry = self._get(source, device)
        with entry.lock:
            yield Lease(entry)

    def _get(self, source: Source, on: str | None = None) -> _Entry:
        device, dtype = pick_device()
        wanted = torch.device(on) if on is not None else device
        if (wanted.type, wanted.index or 0) != (device.type, device.index or 0):
            key = f"{source.location}@{on}"  # the same model on another GPU: its own entry
            device = wanted
        else:
            key = source.location
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        with LOADING:  # one load at a time, and never the same model twice
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry
            pipe = load_pipeline(source, device, dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(pipe, pipeline_bytes(pipe), threading.Lock(), {})
                self._entries[key] = entry
                self.loads += 1
                self._evict(keep=key)
            return entry

    def _evict(self, keep: str) -> None:
        while (
            sum(e.nbytes for e in self._entries.values()) > self.budget and len(self._entries) > 1
        ):
            oldest = next(k for k in self._entries if k != keep)
            del self._entries[oldest]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = ModelCache()
