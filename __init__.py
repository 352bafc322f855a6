"""ComfyUI entry point of the STADI node pack: registers the nodes and the web extension.

ComfyUI imports this file under a file-path module name, which spawned worker processes
cannot import; the engine therefore lives in normally importable packages next to it.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from .nodes.memory_hooks import install as _install_memory_hooks  # noqa: E402

# "Unload models" / POST /free also releases STADI's warm workers (nodes/memory_hooks.py says how).
try:
    _install_memory_hooks()
except Exception as exc:  # the nodes work without it; only the release on /free is lost
    import logging

    logging.getLogger("stadi").warning("STADI: POST /free will not release the worker pools: %s", exc)

from .nodes.remote_workers import open_at_load as _listen_for_remote_workers  # noqa: E402

_listen_for_remote_workers()  # STADI_LISTEN set: workers on other machines can join (nodes/remote_workers.py)

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
