"""ComfyUI's "free memory" requests reach the STADI workers: ``POST /free`` releases the warm pools.

STADI's worker processes hold their own copy of the weights (on each GPU, and in host memory), out
of sight of ComfyUI's memory manager. When a user presses "Unload models" (or "Free model and node
cache") the frontend sends ``POST /api/free`` with ``unload_models`` (and ``free_memory``); ComfyUI
sets flags that its prompt worker reads between prompts to unload its own models. The workers must
be given back on the same request.

Which hook, and why (read in ComfyUI 0.3.64 and in the newest server.py / main.py, 2026):

- The ``/free`` handler only calls ``prompt_queue.set_flag``; the prompt worker reads them with
  ``get_flags()`` and calls ``comfy.model_management.unload_all_models()``. None of these offers a
  callback; hooking them would mean replacing ComfyUI functions (ruled out: no monkey-patching).
- A second ``POST /free`` route cannot be added: aiohttp refuses a duplicate method and path.
- ``PromptServer.__init__`` builds ``self.app = web.Application(middlewares=[...])`` before custom
  nodes are imported, and aiohttp freezes the middleware list only when the server starts
  (``AppRunner.setup`` -> ``pre_freeze``), after every pack has loaded. So a pack may append an
  aiohttp middleware, aiohttp's own extension point, the same way on both versions. Ours lets
  ComfyUI's handler run first, unchanged, and then, if the request asked for ``unload_models`` or
  ``free_memory`` and was accepted, calls ``registry.release_pools()`` in a thread (closing workers
  takes up to seconds; the event loop must not wait): idle pools close at once, a pool in use
  closes when its run ends, and the next STADI run starts fresh workers. This matches ComfyUI's
  own timing: it unloads between prompts, never in the middle of one.

Everything is found by feature (``sys.modules["server"].PromptServer.instance.app.middlewares``
and whether it is frozen), never by version: outside ComfyUI (unit tests, the CLI) nothing is
installed; where the list is already frozen a warning says the idle release
(``STADI_IDLE_RELEASE_S``) is then the only way the workers go.

``GET /stadi/workers`` (added through ``PromptServer.instance.routes``, the documented way for a
pack to add routes) returns ``registry.pool_report()``: what each warm worker holds, live.
"""

from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("stadi")

FREE_PATHS = ("/free", "/api/free")
REPORT_PATH = "/stadi/workers"
MIDDLEWARE_NAME = "stadi_release_workers_on_free"


def wants_release(body) -> bool:
    """Does a ``POST /free`` body ask ComfyUI to unload models or free memory?"""
    return isinstance(body, dict) and bool(body.get("unload_models") or body.get("free_memory"))


def release_in_background(reason: str) -> threading.Thread:
    """``registry.release_pools(reason)`` on a daemon thread (it may wait seconds for workers to exit)."""
    from stadi_core.runtime.registry import release_pools

    def run():
        try:
            out = release_pools(reason)
            if out["released"] or out["deferred"]:
                log.info("STADI: %s: %d worker pool(s) released, %d when their run ends", reason,
                         len(out["released"]), len(out["deferred"]))
        except Exception:
            log.exception("STADI: releasing the worker pools failed (%s)", reason)

    thread = threading.Thread(target=run, name="stadi-release-on-free", daemon=True)
    thread.start()
    return thread


def make_free_middleware():
    """The aiohttp middleware: ComfyUI's handler first, then release the pools if asked to."""
    from aiohttp import web

    @web.middleware
    async def stadi_release_workers_on_free(request, handler):
        response = await handler(request)
        if request.method == "POST" and request.path.rstrip("/") in FREE_PATHS \
                and 200 <= getattr(response, "status", 500) < 300:
            try:
                body = await request.json()  # aiohttp keeps the body the handler already read
            except Exception:
                body = None
            if wants_release(body):
                release_in_background("ComfyUI was asked to unload models (POST /free)")
        return response

    stadi_release_workers_on_free.__name__ = MIDDLEWARE_NAME
    return stadi_release_workers_on_free


def _prompt_server():
    server_module = sys.modules.get("server")  # ComfyUI's main.py imported it before loading packs
    cls = getattr(server_module, "PromptServer", None)
    return getattr(cls, "instance", None)


def install() -> bool:
    """Hook ``POST /free`` and add ``GET /stadi/workers`` when running inside ComfyUI; True if hooked."""
    prompt_server = _prompt_server()
    if prompt_server is None:
        return False  # not inside a ComfyUI server: nothing to hook
    hooked = _install_middleware(getattr(prompt_server, "app", None))
    _install_report_route(getattr(prompt_server, "routes", None))
    return hooked


def _install_middleware(app) -> bool:
    middlewares = getattr(app, "middlewares", None)
    if middlewares is None or not hasattr(middlewares, "append"):
        log.warning("STADI: this ComfyUI's server has no aiohttp middleware list; \"Unload models\" will not stop "
                    "STADI's warm workers (they still go after %s idle seconds)", _idle_setting())
        return False
    if any(getattr(m, "__name__", "") == MIDDLEWARE_NAME for m in middlewares):
        return True  # the pack was imported twice
    if getattr(middlewares, "frozen", False):
        log.warning("STADI: ComfyUI's server started before the STADI pack loaded; \"Unload models\" will not "
                    "stop STADI's warm workers (they still go after %s idle seconds)", _idle_setting())
        return False
    middlewares.append(make_free_middleware())
    return True


def _install_report_route(routes) -> None:
    if routes is None or not hasattr(routes, "get"):
        return
    if any(getattr(r, "path", None) == REPORT_PATH for r in routes):
        return  # the pack was imported twice: aiohttp would refuse the second route at startup
    import asyncio

    from aiohttp import web

    from stadi_core.runtime.registry import pool_report

    @routes.get(REPORT_PATH)
    async def stadi_workers(request):
        # off the event loop: the report waits for the registry, which a closing pool holds for seconds
        return web.json_response(await asyncio.get_running_loop().run_in_executor(None, pool_report))


def _idle_setting() -> str:
    from stadi_core.runtime.registry import IDLE_RELEASE_ENV, idle_release_s

    return f"{idle_release_s():g} ({IDLE_RELEASE_ENV})"
