"""Working configurations per tab, one click each: recipes on the bundled toy zoo that the
controls can show (``ui.form.fits``). A button sets the controls from its recipe, as a dropped PNG
does; nothing runs until Generate."""

from __future__ import annotations

SUPERPOSE_AND = {
    "prompt": "",
    "method": "superpose",
    "experts": [
        {"model": "toy-warm", "prompt": "a red shape"},
        {"model": "toy-warm", "prompt": "a circle"},
    ],
    "superpose": {"mode": "and"},
    "sampler": {"steps": 20, "num_images": 4},
}
SUPERPOSE_OR = {
    "prompt": "",
    "method": "superpose",
    "experts": [
        {"model": "toy-warm", "prompt": "a red circle"},
        {"model": "toy-cool", "prompt": "a blue square"},
    ],
    "superpose": {"mode": "or"},
    "sampler": {"steps": 20, "num_images": 4},
}
EXAMPLES: dict[str, list[tuple[str, dict]]] = {
    "single": [
        ("a red circle (toy-warm)", {"prompt": "a red circle", "experts": [{"model": "toy-warm"}]}),
        (
            "a purple star (toy-base + 2 LoRAs)",
            {
                "prompt": "a purple star",
                "experts": [
                    {
                        "model": "toy-base",
                        "loras": [{"path": "toy-purple"}, {"path": "toy-star"}],
                    }
                ],
            },
        ),
    ],
    "superpose": [
        ("OR: a red circle or a blue square", SUPERPOSE_OR),
        ("AND: a red shape and a circle", SUPERPOSE_AND),
    ],
    "merge": [
        (
            "TIES of toy-warm and toy-cool",
            {
                "prompt": "a red circle",
                "method": "merge",
                "experts": [{"model": "toy-warm"}, {"model": "toy-cool"}],
                "merge": {"method": "ties", "base": "toy-base", "density": 0.2, "lambda": 1.0},
            },
        )
    ],
    "aggregate": [
        (
            "a red circle and a blue square (toy-warm-cool, 64×32)",
            {
                "prompt": "a red circle and a blue square",
                "method": "aggregate",
                "experts": [
                    {"model": "toy-warm", "prompt": "a red circle"},
                    {"model": "toy-cool", "prompt": "a blue square"},
                ],
                "aggregate": {"aggregator": "toy-warm-cool"},
                "sampler": {"width": 64, "height": 32},
            },
        )
    ],
}
"""Per method: (button label, recipe). The recipes are the README's."""
