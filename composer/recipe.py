"""The recipe, version 1: one JSON object that describes one generation (../shared/RECIPE.md).

``parse`` is the one door into the engine: it checks every field once and raises ``RecipeError``
with a message that names the field, the value and what would be accepted. Everything after it
(engine, CLI, page, PNG metadata, links) trusts a ``Recipe`` and never re-checks it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1
MAX_EXPERTS = 8
MAX_LORAS = 8
MAX_EMBEDDINGS = 16
MAX_STEPS = 150
MAX_SIDE = 2048
MAX_IMAGES = 16
MAX_PROMPT = 2000
MAX_SEED = 2**32 - 1

# diffusers-style scheduler names, and the AUTOMATIC1111 names that mean the same sampler
# (../shared/FIELD_NOTES.md); the first A1111 name of a scheduler is the one PNG metadata shows.
SCHEDULERS = (
    "euler",
    "euler_a",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "dpmpp_sde",
    "dpm2",
    "dpm2_a",
    "heun",
    "lms",
    "unipc",
    "ddpm",
    "pndm",
)
A1111_SAMPLERS = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM++ SDE": "dpmpp_sde",
    "DPM2": "dpm2",
    "DPM2 a": "dpm2_a",
    "Heun": "heun",
    "LMS": "lms",
    "UniPC": "unipc",
    "DDPM": "ddpm",
    "PLMS": "pndm",
}
_A1111_LOWER = {name.lower(): key for name, key in A1111_SAMPLERS.items()}


class RecipeError(ValueError):
    """A mistake in what a user asked for. Its message is shown to the user as it is."""


@dataclass(frozen=True)
class Lora:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class Embedding:
    """A textual-inversion embedding (``composer.embeddings``), used wherever ``token`` is
    written in a prompt or the negative prompt."""

    path: str
    token: str


@dataclass(frozen=True)
class Expert:
    model: str
    loras: tuple[Lora, ...] = ()
    prompt: str | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Sampler:
    scheduler: str = "euler"
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    batch_size: int | None = None
    """Images sampled in one pipeline call; ``None``: as many as the device holds. Image i of a
    batch equals the same seed sampled alone only within float rounding (±1/255 after 8-bit
    quantisation on this backend), so a result records the batch size it used and a re-run of
    its recipe makes the same batches (README, "what is exact, and what is not")."""

    def to_dict(self) -> dict[str, Any]:
        """``batch_size`` appears only when set (recipes from before it are unchanged)."""
        out = asdict(self)
        if out["batch_size"] is None:
            del out["batch_size"]
        return out


@dataclass(frozen=True)
class Recipe:
    prompt: str
    experts: tuple[Expert, ...]
    negative_prompt: str = ""
    method: str = "single"
    sampler: Sampler = field(default_factory=Sampler)
    embeddings: tuple[Embedding, ...] = ()
    sections: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Method name → its parsed section (``composer.methods``), for every section the recipe
    holds; a section of a method other than the chosen one is kept as given."""
    version: int = VERSION

    def __getattr__(self, name: str) -> Any:
        """``recipe.merge``, ``recipe.superpose``, …: that method's section, ``None`` if absent."""
        from composer.methods import METHODS

        if name in METHODS and METHODS[name].section is not None:
            return self.sections.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def settings(self) -> Any:
        """The chosen method's section, or its defaults when the recipe gives none."""
        from composer.methods import METHODS

        return METHODS[self.method].settings(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ../shared/RECIPE.md; absent method sections stay absent."""
        from composer.methods import METHODS

        out: dict[str, Any] = {
            "version": self.version,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "method": self.method,
            "experts": [
                {
                    "model": e.model,
                    "loras": [asdict(lo) for lo in e.loras],
                    "prompt": e.prompt,
                    "weight": e.weight,
                }
                for e in self.experts
            ],
        }
        if self.embeddings:
            out["embeddings"] = [asdict(emb) for emb in self.embeddings]
        for name, method in METHODS.items():
            if self.sections.get(name) is not None:
                out[name] = method.section_json(self.sections[name])
        out["sampler"] = self.sampler.to_dict()
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def expert_prompt(self, i: int) -> str:
        """What expert ``i``'s text encoder reads: its prompt (or the recipe's) without
        ``<lora:…>`` tags (``composer.prompts``)."""
        from composer.prompts import strip

        prompt = self.experts[i].prompt
        return strip(self.prompt if prompt is None else prompt)

    def expert_loras(self, i: int) -> tuple[Lora, ...]:
        """Expert ``i``'s LoRAs: its listed ones, then the tags in its prompt."""
        from composer.prompts import expert_loras

        return expert_loras(self, i)

    def untagged(self) -> Recipe:
        """The same generation with every prompt tag moved into its experts' ``loras``."""
        from composer.prompts import untagged

        return untagged(self)


def _listed(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


# --- validation -------------------------------------------------------------------------------

ModelCheck = Callable[[str, str, str], None]
"""``check(kind, reference, where)`` raises ``RecipeError`` when a reference does not resolve;
``kind`` is "model", "lora" or "aggregator". ``composer.registry`` provides the real one."""


def parse(data: dict | str, check: ModelCheck | None = None) -> Recipe:
    """Validate ``data`` (a dict or JSON text) and return a ``Recipe``.

    The common fields are read here; each method's section by that method
    (``composer.methods``). ``check`` resolves model references
    (``composer.registry.check_reference``); without it only the form of each reference is
    checked, which is what reading a PNG from elsewhere needs.
    """
    from composer import untrusted
    from composer.methods import METHODS

    if isinstance(data, (str, bytes, bytearray)):
        data = untrusted.load_json(data)  # the one door: size, depth, numbers, text
    else:
        untrusted.check_tree(data)
    obj = Fields("recipe", data)
    version = obj.integer("version", default=VERSION, low=VERSION, high=VERSION)
    prompt = obj.text("prompt", required=True)
    negative = obj.text("negative_prompt", default="")
    name = obj.choice("method", tuple(METHODS), default="single")
    experts = tuple(
        _expert(f"experts[{i}]", e)
        for i, e in enumerate(obj.array("experts", required=True, low=1, high=MAX_EXPERTS))
    )
    sections = {}
    for key, method in METHODS.items():
        fields = obj.section(key) if method.parse_section is not None else None
        if fields is not None:
            sections[key] = method.parse_section(fields, len(experts))
            fields.done()
    sampler = _sampler(obj.section("sampler") or Fields("sampler", {}))
    from composer.prompts import check as check_tags
    from composer.prompts import embeddings as read_embeddings

    embeddings = read_embeddings(obj.array("embeddings", default=[], high=MAX_EMBEDDINGS))
    obj.done()

    method = METHODS[name]
    low, high = method.experts
    if not low <= len(experts) <= high:
        need = "exactly 1 expert" if low == high == 1 else f"{low} to {high} experts"
        raise RecipeError(f"experts: method '{name}' needs {need}, got {len(experts)}")
    recipe = Recipe(
        prompt=prompt,
        negative_prompt=negative,
        method=name,
        experts=experts,
        sampler=sampler,
        embeddings=embeddings,
        sections=sections,
        version=version,
    )
    tagged = check_tags(recipe)
    if check is not None:
        for i, e in enumerate(recipe.experts):
            check("model", e.model, f"experts[{i}].model")
            for j, lo in enumerate(e.loras):
                check("lora", lo.path, f"experts[{i}].loras[{j}].path")
        for reference, where in tagged:
            check("lora", reference, where)
        for k, emb in enumerate(recipe.embeddings):
            check("embedding", emb.path, f"embeddings[{k}].path")
        for key, method in METHODS.items():
            if key in sections:
                for where, reference in method.models(recipe).items():
                    check("model", reference, where)
                for kind, reference, where in method.references(recipe):
                    check(kind, reference, where)
    return recipe


def _expert(where: str, data: Any) -> Expert:
    obj = Fields(where, data)
    model = obj.reference("model", required=True)
    loras = tuple(
        _lora(f"{where}.loras[{j}]", lo)
        for j, lo in enumerate(obj.array("loras", default=[], high=MAX_LORAS))
    )
    prompt = obj.text("prompt", default=None, nullable=True)
    weight = obj.number("weight", default=1.0, low=-10.0, high=10.0)
    obj.done()
    return Expert(model=model, loras=loras, prompt=prompt, weight=weight)


def _lora(where: str, data: Any) -> Lora:
    obj = Fields(where, data)
    lora = Lora(
        path=obj.reference("path", required=True),
        weight=obj.number("weight", default=1.0, low=-10.0, high=10.0),
    )
    obj.done()
    return lora


def _sampler(obj: Fields) -> Sampler:
    sampler = Sampler(
        scheduler=obj.scheduler("scheduler", default="euler"),
        steps=obj.integer("steps", default=20, low=1, high=MAX_STEPS),
        guidance_scale=obj.number("guidance_scale", default=5.0, low=0.0, high=50.0),
        seed=obj.integer("seed", default=0, low=0, high=MAX_SEED),
        width=obj.side("width"),
        height=obj.side("height"),
        num_images=obj.integer("num_images", default=1, low=1, high=MAX_IMAGES),
        batch_size=obj.integer("batch_size", default=None, low=1, high=MAX_IMAGES, nullable=True),
    )
    obj.done()
    return sampler


def a1111_sampler_name(scheduler: str) -> str:
    return next(name for name, key in A1111_SAMPLERS.items() if key == scheduler)


def normalize_scheduler(name: str) -> str | None:
    """``"DPM++ 2M Karras"`` → ``"dpmpp_2m_karras"``; ``None`` when the name means nothing."""
    key = " ".join(name.strip().lower().split())
    if key in _A1111_LOWER:
        return _A1111_LOWER[key]
    key = key.replace(" ", "_").replace("-", "_")
    return key if key in SCHEDULERS else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MISSING = object()


def looks_like_hub_id(reference: str) -> bool:
    return bool(_HUB_ID.match(reference)) and ".." not in reference


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _close(key: str, known: list[str]) -> list[str]:
    """The known field a typo most likely meant (``modle`` → ``model``), if any."""
    import difflib

    return difflib.get_close_matches(key, [k for k in known if k != key], n=1, cutoff=0.7)


class Fields:
    """Reads the fields of one JSON object, each with its own check, and remembers which were
    read so that ``done`` can name a field nobody asked for (usually a typo)."""

    def __init__(self, where: str, data: Any):
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a JSON object, got {_show(data)}")
        self.where, self.data, self.read = where, data, set()

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.read.add(key)
        if key in self.data:
            return self.data[key]
        if required:
            typo = [k for k in map(str, self.data) if _close(k, [key])]
            if typo:  # "modle" given, "model" missing: name the typo, not only the gap
                self._unknown(typo[0])
            raise RecipeError(f"{self.where}.{key}: missing; this field is required")
        return _MISSING if default is _MISSING else default

    def _unknown(self, key: str) -> None:
        known = sorted(self.read)
        guess = _close(key, known)
        raise RecipeError(
            f"{self.where}: unknown field {_show(key)}"
            + (f"; did you mean {_show(guess[0])}? Accepted" if guess else "; accepted")
            + " fields: "
            + ", ".join(known)
        )

    def _fail(self, key: str, value: Any, accepted: str) -> RecipeError:
        return RecipeError(
            f"{self.where}.{key}: {_show(value)} is not accepted; expected {accepted}"
        )

    def done(self) -> None:
        extra = sorted(str(k) for k in self.data if k not in self.read)
        if extra:
            self._unknown(extra[0])

    def text(
        self, key: str, default: Any = _MISSING, required: bool = False, nullable: bool = False
    ) -> Any:
        value = self._get(key, default, required)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or len(value) > MAX_PROMPT or "\x00" in value:
            raise self._fail(
                key,
                value,
                f"a string of at most {MAX_PROMPT} characters" + (" or null" if nullable else ""),
            )
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self._get(key, default, False)
        if value not in options:
            raise self._fail(key, value, "one of " + ", ".join(options))
        return value

    def integer(
        self, key: str, default: int | None, low: int, high: int, nullable: bool = False
    ) -> int | None:
        value = self._get(key, default, False)
        if value is None and nullable:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            accepted = f"a whole number from {low} to {high}"
            raise self._fail(key, value, ("null or " if nullable else "") + accepted)
        return value

    def number(
        self, key: str, default: float | None, low: float, high: float, nullable: bool = False
    ) -> float | None:
        value = self._get(key, default, False)
        if value is None and nullable:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            accepted = f"a finite number from {low:g} to {high:g}"
            raise self._fail(key, value, ("null or " if nullable else "") + accepted)
        return float(value)

    def numbers(
        self, key: str, default: Any, low: float, high: float, length: int | None = None
    ) -> tuple[float, ...] | None:
        value = self._get(key, default, False)
        if value is None:
            return None
        what = (
            f"null or a list of {length} " if length else "null or a list of "
        ) + f"finite numbers from {low:g} to {high:g}"
        if (
            not isinstance(value, list)
            or (length is not None and len(value) != length)
            or len(value) > 64
        ):
            raise self._fail(key, value, what)
        for v in value:
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or not low <= v <= high
            ):
                raise self._fail(key, value, what)
        return tuple(float(v) for v in value)

    def array(
        self,
        key: str,
        default: Any = _MISSING,
        required: bool = False,
        low: int = 0,
        high: int = 64,
    ) -> list:
        value = self._get(key, default, required)
        if not isinstance(value, list) or not low <= len(value) <= high:
            raise self._fail(key, value, f"a list of {low} to {high} entries")
        return value

    def section(self, key: str) -> Fields | None:
        value = self._get(key, None, False)
        return (
            None
            if value is None
            else Fields(f"{self.where}.{key}" if self.where != "recipe" else key, value)
        )

    def reference(
        self, key: str, default: Any = _MISSING, required: bool = False, nullable: bool = False
    ) -> Any:
        value = self._get(key, default, required)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > 1024 or "\x00" in value:
            raise self._fail(
                key,
                value,
                "a bundled name, a local path or a Hub id" + (" (or null)" if nullable else ""),
            )
        return value.strip()

    def scheduler(self, key: str, default: str) -> str:
        value = self._get(key, default, False)
        name = normalize_scheduler(value) if isinstance(value, str) else None
        if name is None:
            raise self._fail(
                key,
                value,
                "one of " + ", ".join(SCHEDULERS) + ' (or an AUTOMATIC1111 name such as "Euler a")',
            )
        return name

    def side(self, key: str) -> int | None:
        value = self._get(key, None, False)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 16 <= value <= MAX_SIDE
            or value % 8
        ):
            raise self._fail(
                key,
                value,
                f"null (the model's native size) or a multiple of 8 from 16 to {MAX_SIDE}",
            )
        return value
