"""Import this repository as the ComfyUI node pack it is, under the name ``stadi_pack``.

ComfyUI imports a pack by its folder's path and the ComfyUI layer lives in the pack's ``nodes/``
(relative imports only: a top-level ``nodes`` would shadow ComfyUI's own). Tests do the same.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAME = "stadi_pack"


def load_pack():
    if NAME in sys.modules:
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(NAME, None)
        raise
    return module


load_pack()
