"""Serving many users with Ray Serve (``python -m composer serve``, ``serve run config.yaml``).

A ``Composer`` deployment runs recipes, one at a time per replica, multiplexed by the recipe's
model set (``wire.model_set``) so that a request lands where its checkpoints are loaded; the
``Page`` deployment is the ingress (the Gradio page) and calls it through a handle
(``client``). ``placement`` decides which of a replica's GPUs each superposition expert's
model goes on, or refuses saying how many it needs (the superposition runner does not use it yet).

Ray is optional: only this package (and its tests and benchmark) imports it; ``python app.py``
never does.
"""
