"""AUTOMATIC1111's prompt habit of naming LoRAs in the prompt: ``<lora:NAME:weight>``.

A tag attaches its LoRA to the expert(s) whose prompt holds it: a tag in the recipe's ``prompt``
to every expert without a prompt of its own, a tag in ``experts[i].prompt`` to expert *i*. The
tags stay in the stored prompt text, so a PNG, a link or the page shows and reproduces them as
written; what the text encoder sees is the prompt without them (``strip``), as in A1111, whose
``extra_networks.parse_prompt`` removes them before encoding. ``<lyco:…>`` is A1111's other name
for the same thing (its LyCORIS extension). The tag's NAME is a LoRA reference like any other
(``composer.registry.resolve_lora``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from composer.recipe import MAX_LORAS, Embedding, Fields, Lora, Recipe, RecipeError

KINDS = ("lora", "lyco")
_CANDIDATE = re.compile(r"<\s*(lora|lyco|hypernet)\b([^<>]*)(>?)", re.IGNORECASE)
_SPACED = re.compile(r"[ \t]*" + _CANDIDATE.pattern + r"[ \t]*", re.IGNORECASE)
_FORM = "<lora:NAME> or <lora:NAME:weight> (a number from -10 to 10)"


@dataclass(frozen=True)
class Tag:
    text: str
    """The tag as written, ``<lora:add_detail:0.8>``."""
    name: str
    weight: float


def tags(text: str, where: str) -> list[Tag]:
    """The LoRA tags of ``text``; ``RecipeError`` naming the first malformed one."""
    found = []
    for match in _CANDIDATE.finditer(text):
        kind, args, closed = match.group(1).lower(), match.group(2), match.group(3)
        written = match.group(0)
        if kind == "hypernet":
            raise RecipeError(
                f"{where}: {written!r} is a hypernetwork tag; hypernetworks are not supported, "
                f"expected {_FORM}"
            )
        parts = args.split(":")
        if not closed or parts[0].strip() or len(parts) < 2 or not parts[1].strip():
            raise RecipeError(f"{where}: the tag {written!r} is malformed; expected {_FORM}")
        name, numbers = parts[1].strip(), [p.strip() for p in parts[2:]]
        weights = [_number(n) for n in numbers]
        if any(w is None for w in weights) or len(weights) > 2:
            raise RecipeError(f"{where}: the tag {written!r} is malformed; expected {_FORM}")
        if len(set(weights)) > 1:
            raise RecipeError(
                f"{where}: the tag {written!r} gives the text encoder and the U-Net different "
                f"strengths, which is not supported; expected {_FORM}"
            )
        found.append(Tag(written, name, weights[0] if weights else 1.0))
    return found


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and -10.0 <= value <= 10.0 else None


def strip(text: str) -> str:
    """``text`` as the text encoder sees it: without its tags (a text without tags unchanged).
    The spaces around a removed tag become one; CLIP's tokenizer reads any whitespace alike."""
    if not _CANDIDATE.search(text):
        return text
    return _SPACED.sub(" ", text).strip()


def tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"


def expert_loras(recipe: Recipe, i: int) -> tuple[Lora, ...]:
    """Expert ``i``'s LoRAs: those listed in ``experts[i].loras``, then its prompt's tags."""
    expert = recipe.experts[i]
    text, where = _prompt_of(recipe, i)
    return expert.loras + tuple(Lora(t.name, t.weight) for t in tags(text, where))


def _prompt_of(recipe: Recipe, i: int) -> tuple[str, str]:
    own = recipe.experts[i].prompt
    return (recipe.prompt, "prompt") if own is None else (own, f"experts[{i}].prompt")


def check(recipe: Recipe) -> list[tuple[str, str]]:
    """Refuse what tags cannot mean; return each tag's (LoRA reference, field) for the
    reference check. Called once, by ``composer.recipe.parse``."""
    if tags(recipe.negative_prompt, "negative_prompt"):
        raise RecipeError(
            "negative_prompt: LoRA tags are not accepted in the negative prompt; put "
            f"{tags(recipe.negative_prompt, 'negative_prompt')[0].text!r} in the prompt"
        )
    shared = tags(recipe.prompt, "prompt")
    if shared and all(e.prompt is not None for e in recipe.experts):
        raise RecipeError(
            f"prompt: {shared[0].text!r} would attach to no expert: every expert has its own "
            "prompt; put the tag in the prompt of the expert it is for"
        )
    references: dict[tuple[str, str], None] = {}
    for i in range(len(recipe.experts)):
        text, where = _prompt_of(recipe, i)
        found = tags(text, where)
        loras = expert_loras(recipe, i)
        if len(loras) > MAX_LORAS:
            raise RecipeError(
                f"experts[{i}]: {len(loras)} LoRAs (listed and tagged in its prompt); at most "
                f"{MAX_LORAS}"
            )
        seen = [lo.path for lo in loras]
        twice = next((p for p in seen if seen.count(p) > 1), None)
        if twice is not None:
            raise RecipeError(
                f"experts[{i}]: the LoRA {twice!r} is named twice (in experts[{i}].loras or in a "
                f"tag of {where}); name it once, with the strength you want"
            )
        references.update(dict.fromkeys((t.name, f"{where} {t.text}") for t in found))
    return list(references)


def untagged(recipe: Recipe) -> Recipe:
    """``recipe`` with every prompt tag moved into its experts' ``loras`` (what an export, which
    reads only the listed LoRAs, is given)."""
    experts = tuple(
        replace(
            e, loras=recipe.expert_loras(i), prompt=None if e.prompt is None else strip(e.prompt)
        )
        for i, e in enumerate(recipe.experts)
    )
    return replace(recipe, prompt=strip(recipe.prompt), experts=experts)


_TOKEN = re.compile(r"^[^\s<>:,]{1,64}$")


def embeddings(entries: list) -> tuple[Embedding, ...]:
    """The recipe's ``embeddings``: ``[{"path": …, "token": …}]``. ``token`` defaults to the
    file's name, as A1111 names an embedding; two embeddings may not share a token."""
    out = []
    for k, data in enumerate(entries):
        where = f"embeddings[{k}]"
        obj = Fields(where, data)
        path = obj.reference("path", required=True)
        name = path.replace("\\", "/").rstrip("/").split("/")[-1]
        token = obj.text("token", default=re.sub(r"\.(safetensors|pt|bin)$", "", name))
        obj.done()
        if not _TOKEN.match(token):
            raise RecipeError(
                f"{where}.token: {token!r} is not accepted; expected 1 to 64 characters "
                "without spaces, '<', '>', ':' or ','"
            )
        if token in [e.token for e in out]:
            raise RecipeError(f"{where}.token: {token!r} is given twice; tokens must differ")
        out.append(Embedding(path=path, token=token))
    return tuple(out)
