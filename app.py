"""Diffusion Composer: ``python app.py`` serves the page (``ui``) on http://127.0.0.1:7860.

The Hugging Face Space's ``app_file``. On ZeroGPU the bundled models are loaded before the server
starts (``ui.run.preload``), so that every GPU worker gets them.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ui import run
from ui.handlers import OUTPUT_DIR
from ui.page import CSS, build


def main() -> None:
    from composer import registry

    registry.quiet_libraries()
    if os.environ.get("SPACES_ZERO_GPU"):
        run.preload()
    demo = build().demo
    demo.queue(default_concurrency_limit=int(os.environ.get("COMPOSER_CONCURRENCY", "1")))
    # With the ``mcp`` package (``pip install "gradio[mcp]"``) the page is also an MCP server:
    # its documented endpoints (generate, share, export_merge) become tools for assistants.
    demo.launch(allowed_paths=[str(OUTPUT_DIR)], css=CSS, mcp_server=find_spec("mcp") is not None)


if __name__ == "__main__":
    main()
