"""Diffusion Composer: ``python app.py`` serves the page (``ui``) on http://127.0.0.1:7860.

The Hugging Face Space's ``app_file``. On ZeroGPU the bundled models are loaded before the server
starts (``ui.run.preload``), so that every GPU worker gets them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ui import run
from ui.page import build, launch_options


def main() -> None:
    from composer import registry

    registry.quiet_libraries()
    if os.environ.get("SPACES_ZERO_GPU"):
        run.preload()
    demo = build().demo
    demo.queue(default_concurrency_limit=int(os.environ.get("COMPOSER_CONCURRENCY", "1")))
    demo.launch(**launch_options())


if __name__ == "__main__":
    main()
