"""Trainers: the AFA aggregator's one training loop (``aggregator``), the users' data
(``data``) and their command line (``cli``, ``python -m composer aggregate train``)."""
