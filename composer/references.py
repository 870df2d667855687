"""Model, LoRA, aggregator, router and embedding references → where their weights are,
checked but not loaded (``composer.registry`` loads them).

A model reference is a bundled name (``toy-warm``, a folder under ``assets/models``), a local
diffusers folder, a single-file ``.safetensors`` checkpoint, or a Hugging Face Hub id. LoRA
references are a bundled name (``assets/loras``), a name in the user's LoRA folder
(``COMPOSER_LORA_DIR``), a ``.safetensors`` file, a folder holding one, or a Hub id.

Pickle files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) can run code when loaded, so they are
refused unless ``COMPOSER_ALLOW_PICKLE=1`` is set (or the CLI's ``--allow-pickle``). In hosted
mode (``composer.hosted``) only the bundled zoo, Hub ids and the visitor's uploads resolve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from composer import hosted, zoo
from composer.checkpoints import validate
from composer.recipe import RecipeError, looks_like_hub_id
from composer.zoo import bundled

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_MODEL = "toy-warm"


def pickle_allowed() -> bool:
    return os.environ.get("COMPOSER_ALLOW_PICKLE", "") in ("1", "true", "yes")


@dataclass(frozen=True)
class Source:
    """Where a reference points: ``kind`` is bundled, folder, single_file or hub."""

    reference: str
    kind: str
    location: str


@dataclass(frozen=True)
class _Kind:
    """What a reference of one kind may name: a bundled folder under ``ASSETS / folder``, a local
    folder holding ``marker``, a weights file, or a Hub id; and the messages that refuse the rest
    (formatted with ``where``, ``reference`` (repr) and ``names``, the bundled ones)."""

    folder: str
    marker: str
    not_a_folder: str
    missing: str
    unknown: str


_MODELS = _Kind(
    "models",
    "model_index.json",
    not_a_folder="{where}: {reference} is a folder but not a diffusers pipeline "
    "(it has no model_index.json)",
    missing="{where}: {reference} does not exist",
    unknown="{where}: unknown model {reference}; expected a bundled model ({names}), a diffusers "
    "folder, a .safetensors file or a Hub id (owner/name)",
)
_LORAS = _Kind(
    "loras",
    LORA_FILE,
    not_a_folder="{where}: {reference} is not a LoRA file or a folder holding " + LORA_FILE,
    missing="{where}: {reference} is not a LoRA file or a folder holding " + LORA_FILE,
    unknown="{where}: unknown LoRA {reference}; expected a bundled LoRA ({names}), a name in "
    "COMPOSER_LORA_DIR, a .safetensors file or a Hub id (owner/name)",
)


def _resolve(reference: str, where: str, kind: _Kind) -> Source:
    names = bundled(kind.folder)
    if reference in names:
        return Source(reference, "bundled", str(names[reference]))
    own = {} if hosted.active() or kind.folder != "loras" else zoo.user_files("loras")
    if reference in own:  # a name in COMPOSER_LORA_DIR, as A1111's <lora:NAME> finds it
        _check_weights_file(own[reference], where)
        return Source(reference, "single_file", str(own[reference]))
    if hosted.active() and not hosted.uploaded(reference):
        if looks_like_hub_id(reference) and not _looks_like_path(reference):
            return Source(reference, "hub", reference)
        label = {"models": "model", "loras": "LoRA"}[kind.folder]
        raise hosted.refusal(reference, where, label, ", ".join(names))
    path = Path(reference).expanduser()
    shown = {"where": where, "reference": repr(reference), "names": ", ".join(names)}
    if _looks_like_path(reference) or path.exists():
        if path.is_dir():
            if (path / kind.marker).is_file():
                return Source(reference, "folder", str(path.resolve()))
            raise RecipeError(kind.not_a_folder.format(**shown))
        if path.is_file():
            _check_weights_file(path, where)
            return Source(reference, "single_file", str(path.resolve()))
        raise RecipeError(kind.missing.format(**shown))
    if looks_like_hub_id(reference):
        return Source(reference, "hub", reference)
    raise RecipeError(kind.unknown.format(**shown))


def resolve_model(reference: str, where: str = "model") -> Source:
    return _resolve(reference, where, _MODELS)


def resolve_lora(reference: str, where: str = "lora") -> str:
    """A LoRA reference → the path of its weights file, or a Hub id."""
    source = _resolve(reference, where, _LORAS)
    if source.kind == "bundled":
        return str(Path(source.location) / LORA_FILE)
    if source.kind == "folder":
        return str((Path(source.location) / LORA_FILE).resolve())
    return source.location


def resolve_aggregator(reference: str, where: str = "aggregator") -> str:
    return _resolve_trained("aggregators", "aggregator", reference, where)


def resolve_router(reference: str, where: str = "router") -> str:
    return _resolve_trained("routers", "router", reference, where)


def _resolve_trained(folder: str, label: str, reference: str, where: str) -> str:
    """A small trained model's folder (an AFA aggregator, a superposition router): a bundled
    name under ``ASSETS / folder``, or a local folder outside hosted mode."""
    names = bundled(folder)
    if reference in names:
        return str(names[reference])
    if hosted.active():
        raise RecipeError(
            f"{where}: {reference!r} is not available on this server; expected a bundled "
            f"{label} ({', '.join(names) or 'none bundled'})"
        )
    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise RecipeError(
        f"{where}: unknown {label} {reference!r}; expected a bundled {label} ("
        + (", ".join(names) or "none bundled yet")
        + ") or a folder"
    )


def check_reference(kind: str, reference: str, where: str) -> None:
    """The ``check`` that ``composer.recipe.parse`` calls for every reference in a recipe."""
    {
        "model": resolve_model,
        "lora": resolve_lora,
        "aggregator": resolve_aggregator,
        "router": resolve_router,
        "embedding": resolve_embedding,
    }[kind](reference, where)


def _looks_like_path(reference: str) -> bool:
    return (
        reference.startswith(("/", "./", "../", "~"))
        or reference.endswith((".safetensors", *PICKLE_SUFFIXES))
        or (os.sep in reference and not looks_like_hub_id(reference))
    )


def _check_weights_file(path: Path, where: str) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not pickle_allowed():
            raise RecipeError(
                f"{where}: {str(path)!r} is a pickle file ({suffix}), which can run code when "
                "loaded; convert it to .safetensors, or allow pickle files explicitly with "
                "COMPOSER_ALLOW_PICKLE=1 (CLI: --allow-pickle)"
            )
        return
    if suffix != ".safetensors":
        raise RecipeError(f"{where}: {str(path)!r} is not a .safetensors file")
    try:
        validate.check_header(path)
    except (OSError, validate.WeightsError) as e:
        reason = e.reason if isinstance(e, validate.WeightsError) else str(e)
        raise RecipeError(
            f"{where}: {str(path)!r} is not a readable .safetensors file ({reason})"
        ) from None


def resolve_embedding(reference: str, where: str = "embedding") -> str:
    """A textual-inversion embedding reference → its file (``composer.embeddings``): a
    ``.safetensors`` file, or a pickle ``.pt``/``.bin`` where pickle files are allowed."""
    if hosted.active() and not hosted.uploaded(reference):
        raise RecipeError(
            f"{where}: {reference!r} is not available on this server; upload the embedding file"
        )
    own = {} if hosted.active() else zoo.user_files("embeddings")
    path = own.get(reference) or Path(reference).expanduser()
    if not path.is_file():
        raise RecipeError(
            f"{where}: {reference!r} is not an embedding file; expected the path of a "
            ".safetensors file or a name in COMPOSER_EMBEDDING_DIR"
            + (f" ({', '.join(sorted(own)[:8])})" if own else "")
        )
    _check_weights_file(path, where)
    return str(path.resolve())
