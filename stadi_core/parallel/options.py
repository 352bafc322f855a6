"""How displaced context is exchanged: what is sent, how it is coded, and when it is waited for.

These options cross process boundaries inside the plan (``Plan.context``), so every rank of a
run exchanges the same way. They only change displaced (REFRESH/STALE) calls: synchronous calls
(exact mode, warmup) always exchange every band's full context, uncompressed, so exact mode stays
exact whatever is set here.

* ``context``  — ``full``: every band's K/V (DistriFusion); ``partial``: each band attends to its
  own K/V plus the nearest ``portion`` of each adjacent band's rows (PCPP), and only those rows
  are sent, to that neighbour only. Conv halos and GroupNorm statistics are exchanged in full.
* ``exchange`` — ``raw``: the tensors as they are; ``fp8``: e4m3 with per-channel scales;
  ``delta``: the change since the last sent version, quantised to ``delta_bits`` with error
  feedback (the receiver's copy never drifts further than one quantisation step);
  ``delta-lossless``: the change coded as the XOR of the bit patterns (exactly full displaced,
  for testing the delta machinery; no bytes saved).
* ``overlap``  — start each layer's exchange as soon as the layer has computed it and wait for it
  only when the next sync call's same layer needs it; off: wait for everything when the next sync
  call begins (the engine before overlap, kept for comparison).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import PlanError

CONTEXTS = ("full", "partial")
EXCHANGES = ("raw", "fp8", "delta", "delta-lossless")
DELTA_BITS = (2, 4, 8)


@dataclass(frozen=True)
class ContextOptions:
    context: str = "full"
    portion: float = 0.3  # partial: fraction of each adjacent band's rows, nearest rows first
    exchange: str = "raw"
    overlap: bool = True
    delta_bits: int = 4

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise PlanError(f"context {self.context!r} is not one of {', '.join(CONTEXTS)}")
        if self.exchange not in EXCHANGES:
            raise PlanError(f"exchange {self.exchange!r} is not one of {', '.join(EXCHANGES)}")
        portion = float(self.portion)
        if not (math.isfinite(portion) and 0.0 < portion <= 1.0):
            raise PlanError(f"portion {self.portion!r} must be in (0, 1]: the share of each neighbour band's "
                            "rows a band attends to (0.3 as in PCPP; 1.0 = the whole neighbour band)")
        object.__setattr__(self, "portion", portion)
        if int(self.delta_bits) not in DELTA_BITS:
            raise PlanError(f"delta_bits {self.delta_bits!r} must be one of {DELTA_BITS}")
        object.__setattr__(self, "delta_bits", int(self.delta_bits))
        object.__setattr__(self, "overlap", bool(self.overlap))

    @property
    def partial(self) -> bool:
        return self.context == "partial"

    @property
    def compressed(self) -> bool:
        return self.exchange != "raw"

    @property
    def is_default(self) -> bool:
        return self == ContextOptions()

    def label(self) -> str:
        """Short human name, e.g. 'full', 'fp8', 'partial 0.3 + delta4'."""
        parts = [f"partial {self.portion:g}"] if self.partial else []
        if self.exchange == "delta":
            parts.append(f"delta{self.delta_bits}")
        elif self.compressed:
            parts.append(self.exchange)
        text = " + ".join(parts) or "full"
        return text if self.overlap else text + " (no overlap)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "ContextOptions" | None) -> "ContextOptions":
        if data is None:
            return cls()
        if isinstance(data, ContextOptions):
            return data
        try:
            return cls(**dict(data))
        except TypeError as e:
            raise PlanError(f"malformed context options {dict(data)!r}: {e}") from e

    @classmethod
    def parse(cls, text: str) -> "ContextOptions":
        """From a CLI/node string: 'full', 'partial', 'partial:0.3', 'fp8', 'delta', 'partial:0.3+delta',
        'delta-lossless', optionally ',no-overlap'."""
        text = (text or "full").strip().lower()
        overlap = True
        if text.endswith(",no-overlap"):
            text, overlap = text[: -len(",no-overlap")], False
        context, portion, exchange = "full", 0.3, "raw"
        for part in (p.strip() for p in text.split("+") if p.strip()):
            name, _, arg = part.partition(":")
            if name in CONTEXTS:
                context = name
                if arg:
                    try:
                        portion = float(arg)
                    except ValueError:
                        raise PlanError(f"partial portion {arg!r} is not a number (e.g. partial:0.3)") from None
            elif name in EXCHANGES:
                exchange = name
            else:
                raise PlanError(f"context option {part!r} is not one of {', '.join(CONTEXTS + EXCHANGES)} "
                                "(e.g. 'partial:0.3+delta')")
        return cls(context=context, portion=portion, exchange=exchange, overlap=overlap)
