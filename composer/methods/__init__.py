"""The composition methods, one module each, and the one registry that names them.

Adding a method: write its module (a ``Method`` named ``METHOD``: section, runner, cost, form;
see ``composer.methods.method``) and add it to ``_MODULES`` below; or, from outside the package,
``register(method)``. The recipe parser, the engine, the CLI and the page find it here.
"""

from __future__ import annotations

from composer.methods import aggregate, merge, single, superpose
from composer.methods.method import Control, Form, Method

__all__ = ["METHODS", "Control", "Form", "Method", "register", "unregister"]

_MODULES = (single, merge, superpose, aggregate)  # the order of the tabs and of JSON's sections

METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in _MODULES}


def register(method: Method) -> Method:
    """Make ``method`` available to recipes, the engine, the CLI and the page."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)
