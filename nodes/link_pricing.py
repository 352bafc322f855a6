"""Plans made inside ComfyUI, priced with the links to the machines whose workers joined (issue #14).

The planner (stadi_core/arrange.py ``choose_plan``) prices each arrangement per pair of devices from
three things, which the standalone engine gathers in ``api._price_links`` and this module gathers for
the ComfyUI server:

- the links, measured when each worker joined (the server's lobby, nodes/remote_workers.py);
- the bytes one call sends, per rank: counted on this model at this latent size by one synchronous
  call of a meta-device copy of the server's network made patch-parallel with a counting stand-in for
  the transport (stadi_core/exchange_probe.py; models/comfy_common.py ``meta_network``). Counted, not
  taken from the previous run's transport counters: the first run on a model has no previous run, a
  displaced run's counters hold its light context rather than the synchronous call's full context,
  and the count on the meta device takes a second even for SDXL, with no memory and no compute;
- the devices' speeds in rows/s (Deployment.measure on the model), since link seconds cannot be set
  against relative speeds.

``plan_choice`` is what Deployment.plan calls, links or not.
"""

from __future__ import annotations

import os
from typing import Sequence

from stadi_core.arrange import Choice, choose_plan, host_shared_speeds
from stadi_core.cost_model import ExchangeCost

# (model key, latent H, W, batch, CFG branches, alignment) -> ExchangeCost counted on the model
_EXCHANGES: dict[tuple, ExchangeCost] = {}


def joined(names: Sequence[str]) -> list[str]:
    """The devices that joined from other machines (``HOST/DEVICE``)."""
    return [n for n in names if "/" in n]


def counted_exchange(spec, *, height: int, width: int, batch: int, branches: bool, align: int) -> ExchangeCost:
    """What one synchronous call of ``spec``'s network sends per rank at this size (cached per model and size)."""
    from stadi_core.exchange_probe import measure_exchange

    key = (spec.key(), height, width, batch, branches, align)
    if key not in _EXCHANGES:
        _EXCHANGES[key] = measure_exchange(spec, height=height, width=width, batch=batch,
                                           cfg=2.0 if branches else 1.0, align=align)
    return _EXCHANGES[key]


def plan_choice(height: int, names: Sequence[str], speeds: Sequence[float], *, links=None, **plan_kw) -> Choice:
    """choose_plan over ``names`` (CPU workers of this host share its cores: host_shared_speeds).

    ``links``: (lobby, ExchangeCost) to price the links to other machines; ``speeds`` must then be
    rows/s of one call of both branches (measured), else only compute is priced."""
    names = list(names)
    together, alone = host_shared_speeds(names, speeds, cpu_count=os.cpu_count() or 1)
    priced = {}
    if links is not None and len(names) > 1 and joined(names):
        lobby, exchange = links
        priced = {"link": lobby.link_model(names), "exchange": exchange}
    return choose_plan(height, together, devices=names, alone_speeds=alone, **priced, **plan_kw)


def bytes_text(exchange: ExchangeCost) -> str:
    return (f"context per synchronous call, per rank: {exchange.bytes_fixed:,.0f} B + {exchange.bytes_per_row:,.0f} B "
            f"per band row in {exchange.messages} all-gathers (counted on the model)")


def priced_note(choice: Choice, names: Sequence[str], speeds: Sequence[float], exchange: ExchangeCost) -> str:
    """The report's line that says the plan was priced with the links: seconds per step of every
    arrangement, the speeds and the bytes it was priced from."""
    arrangements = ", ".join(f"{c.name} {c.predicted_s:.4g} s" for c in choice.candidates)
    devices = ", ".join(f"{n} {s:.4g}" for n, s in zip(names, speeds))
    return (f"plan priced with the links to other machines, predicted per step: {arrangements} (chosen first); "
            f"device speeds (rows/s on the model): {devices}; {bytes_text(exchange)}")


def unpriced_note(names: Sequence[str], why: str, exchange: ExchangeCost | None = None) -> str:
    """Why the links were left out of the price; with ``exchange``, what a call sends across them all the same."""
    hosts = ", ".join(sorted({n.split("/")[0] for n in joined(names)}))
    return f"links to {hosts} not priced: {why}" + (f"; {bytes_text(exchange)}" if exchange is not None else "")
