"""Textual-inversion embeddings as model-sharing sites serve them, used by their token.

A recipe lists them once, at the top level (``embeddings: [{"path", "token"}]``), because a token
is vocabulary: like A1111's embeddings folder, it means the same thing in every prompt that
writes it, the negative prompt included ("easynegative"), whichever expert reads the prompt.

Files: A1111's ``.safetensors`` (``emb_params``, or ``string_to_param`` flattened as
``string_to_param.*``), SDXL's (``clip_l`` for the first text encoder, ``clip_g`` for the second),
diffusers' (one tensor under the token's name), and the same layouts in pickle ``.pt``/``.bin``
where pickle files are allowed. A tensor of *n* rows is *n* vectors: the token becomes ``token
token_1 … token_{n-1}``, as diffusers' ``load_textual_inversion`` does (its ``maybe_convert_prompt``
expands the prompt, so we reuse it).

The cached pipelines are never changed: a request whose prompts write a token gets its own copy
of the tokenizer with the token added, and a shallow copy of the text encoder whose token
embedding looks up the new ids in the embedding's vectors and every other id in the shared
matrix (``ExtendedEmbedding``), so the request after it, with or without the token, reads the
model as it was, and the same recipe makes the same pixels as diffusers' in-place loading.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from composer.recipe import RecipeError

if TYPE_CHECKING:
    from composer.methods.sampling import Job
    from composer.recipe import Recipe

ENCODERS = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))
"""The (tokenizer, text encoder) pairs of SD and SDXL pipelines, and the key of an SDXL
embedding file that holds each one's vectors."""


def read(path: str, where: str) -> dict[str, torch.Tensor]:
    """An embedding file's vectors, (n, width) float32: ``{"clip_l": …, "clip_g": …}`` for SDXL,
    ``{"": …}`` for one text encoder. Cached by (path, size, modification time)."""
    stat = Path(path).stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _READ:
        if len(_READ) > 64:
            _READ.clear()
        _READ[key] = _vectors(_load(path, where), path, where)
    return _READ[key]


_READ: dict[tuple, dict[str, torch.Tensor]] = {}


def _load(path: str, where: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for every damage
            raise RecipeError(
                f"{where}: {path!r} is not a readable .safetensors file ({e})"
            ) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RecipeError(f"{where}: {path!r} is not a readable embedding file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        return {"string_to_param": next(iter(data["string_to_param"].values()))}
    return data if isinstance(data, dict) else {"": data}


def _vectors(state: dict, path: str, where: str) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "clip_l" in tensors or "clip_g" in tensors:
        found = {k: tensors[k] for k in ("clip_l", "clip_g") if k in tensors}
    else:
        named = [k for k in ("emb_params", "string_to_param.*", "string_to_param") if k in tensors]
        if named:
            found = {"": tensors[named[0]]}
        elif len(tensors) == 1:
            found = {"": next(iter(tensors.values()))}
        else:
            shown = ", ".join(sorted(tensors)[:4]) or "none"
            raise RecipeError(
                f"{where}: {path!r} is not a textual-inversion embedding (tensors: {shown}); "
                "expected A1111's emb_params or string_to_param, SDXL's clip_l and clip_g, or "
                "one tensor"
            )
    out = {}
    for name, vectors in found.items():
        vectors = vectors.detach().float()
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= 75:
            raise RecipeError(
                f"{where}: {path!r} holds a tensor of shape {tuple(vectors.shape)}; expected "
                "(vectors, width) with 1 to 75 vectors"
            )
        if not torch.isfinite(vectors).all():
            raise RecipeError(f"{where}: {path!r} holds a value that is not finite (NaN or inf)")
        out[name] = vectors
    return out


class ExtendedEmbedding(torch.nn.Module):
    """A token embedding with more ids: ``ids`` look up ``vectors``, every other id the shared
    ``base`` (unchanged and not copied)."""

    def __init__(self, base: torch.nn.Module, ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.ids = ids
        self.register_buffer("vectors", vectors.to(base.weight), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for k, token_id in enumerate(self.ids):
            out = torch.where((input_ids == token_id)[..., None], self.vectors[k], out)
        return out


def _with_input_embedding(model: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` whose input embedding is ``new``; every other module, weight
    and adapter is shared with ``model``."""
    old = model.get_input_embeddings()
    path = next(name for name, module in model.named_modules() if module is old)

    def replaced(root: torch.nn.Module, path: str) -> torch.nn.Module:
        clone = copy.copy(root)
        clone._modules = dict(root._modules)
        head, _, rest = path.partition(".")
        clone._modules[head] = new if not rest else replaced(root._modules[head], rest)
        return clone

    return replaced(model, path)


def used(recipe: Recipe) -> list[int]:
    """Indices of the recipe's embeddings whose token some prompt (or the negative) writes."""
    texts = [recipe.expert_prompt(i) for i in range(len(recipe.experts))]
    texts.append(recipe.negative_prompt)
    return [
        k for k, emb in enumerate(recipe.embeddings) if any(emb.token in text for text in texts)
    ]


def resolve(recipe: Recipe) -> list[tuple[str, str]]:
    """(token, file) of each embedding the recipe's prompts use; ``RecipeError`` for a reference
    that does not resolve or a file that is not an embedding."""
    from composer import registry

    out = []
    for k in used(recipe):
        emb, where = recipe.embeddings[k], f"embeddings[{k}].path"
        path = registry.resolve_embedding(emb.path, where)
        read(path, where)
        out.append((emb.token, path))
    return out


def apply(pipe, job: Job) -> None:
    """Give ``pipe`` (a request-local pipeline: it is changed) the request's embeddings: its own
    tokenizer(s) with their tokens and text encoder(s) that read them. Nothing when no prompt of
    the request writes a token."""
    changed = {}
    for tokenizer_name, encoder_name, key in ENCODERS:
        tokenizer = getattr(pipe, tokenizer_name, None)
        encoder = getattr(pipe, encoder_name, None)
        if tokenizer is None or encoder is None or not job.embeddings:
            continue
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        tokenizer = copy.deepcopy(tokenizer)
        base = encoder.get_input_embeddings()
        names, rows = [], []
        for k, (token, path) in enumerate(job.embeddings):
            where = f"embeddings[{k}]"
            vectors = _for_encoder(read(path, where), key, sdxl, path, where)
            if vectors.shape[1] != base.embedding_dim:
                raise RecipeError(
                    f"{where}: {path!r} has vectors {vectors.shape[1]} wide; this model's "
                    f"{encoder_name} takes {base.embedding_dim} (an embedding for another "
                    "architecture)"
                )
            tokens = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
            taken = [t for t in tokens if t in tokenizer.get_vocab()]
            if taken:
                raise RecipeError(
                    f"{where}.token: {taken[0]!r} is already a word of this model's tokenizer; "
                    "choose another token"
                )
            names += tokens
            rows.append(vectors)
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        extended = ExtendedEmbedding(base, ids, torch.cat(rows))
        changed[tokenizer_name] = tokenizer
        changed[encoder_name] = _with_input_embedding(encoder, extended)
    if changed:
        pipe.register_modules(**changed)


def _for_encoder(
    vectors: dict[str, torch.Tensor], key: str, sdxl: bool, path: str, where: str
) -> torch.Tensor:
    if sdxl and key not in vectors:
        raise RecipeError(
            f"{where}: {path!r} has no {key!r} vectors; an SDXL model needs an SDXL embedding "
            "(clip_l and clip_g)"
        )
    if not sdxl and "" not in vectors:
        raise RecipeError(
            f"{where}: {path!r} is an SDXL embedding (clip_l, clip_g); this model has one text "
            "encoder"
        )
    return vectors[key if sdxl else ""]
