"""How many bytes one sync call's context exchange moves, per rank, for every context option.

The planner and the simulator price displaced patch parallelism by its traffic, so the bytes must
come from the architecture, not from a measured constant that only holds for one option. A model
is described by a layer inventory: every patch-parallel layer with its kind, channels and
resolution (the latent divided by ``divisor`` in both directions):

* ``kv``      — a self-attention's K and V of the band's tokens, sent as one tensor [B, N, 2C]
  (the engine concatenates K and V); N = band rows at the layer x width at the layer.
* ``halo``    — a 3x3 conv's input rows next to the band: [B, C, 2 pad, W/d], all-gathered as
  [top rows; bottom rows] (pad 1: 2 rows) in synchronous calls; in displaced calls the top pad
  rows go to the band above and the bottom ones to the band below only, point to point.
* ``moments`` — a GroupNorm's per-(sample, group) [mean, var], float32 [2, B, G]; never compressed.

Byte convention (the engine's transport counts exactly this, per rank per network call): an
all-gather contributes payload x (P - 1), the payload padded to the largest band along the band
dimension (the engine pads all-gathers to equal shapes); a point-to-point send contributes its
bytes once per destination, unpadded. ``traffic`` returns the bytes and messages each rank sends
to each other rank, so the per-rank total follows the convention and the cost model can time
each link separately.

Displaced sync calls after warmup use ``ContextOptions`` (parallel/options.py): ``partial``
sends each adjacent band only the nearest ceil(portion x rows) rows of the sender's band at the
attention's resolution, point to point; ``fp8`` codes K/V and halos as 1 byte per value plus a
float32 scale per channel; ``delta`` as ``delta_bits`` per value plus the same scales;
``delta-lossless`` is the size of raw (parallel/codecs.py ``nbytes`` is the reference).
Synchronous calls (warmup, exact mode) always all-gather everything raw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import PlanError
from .parallel.options import ContextOptions

__all__ = ["KINDS", "Layer", "Inventory", "SDXL_UNET", "SD15_UNET", "FLUX_DIT", "INVENTORIES", "Traffic",
           "traffic", "call_bytes", "legacy_exchange", "layer_rows"]

KINDS = ("kv", "halo", "moments")
SCALE_BYTES = 4  # one float32 scale per channel of a coded payload (codecs.py)
MOMENT_BYTES = 4  # GroupNorm moments travel as float32


@dataclass(frozen=True)
class Layer:
    """``count`` identical patch-parallel layers. ``channels``: kv the hidden size C of K (and of
    V), halo the conv's input channels, moments the GroupNorm's groups; ``rows``: halo rows sent."""

    kind: str
    channels: int
    divisor: int = 1
    count: int = 1
    rows: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"layer kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.channels < 1 or self.divisor < 1 or self.count < 0 or self.rows < 0:
            raise PlanError(f"malformed layer {self}")


@dataclass(frozen=True)
class Inventory:
    """Every patch-parallel layer of one network, and the channels of its raw output."""

    name: str
    layers: tuple[Layer, ...]
    out_channels: int
    note: str = ""

    def count(self, kind: str) -> int:
        return sum(layer.count for layer in self.layers if layer.kind == kind)

    @property
    def messages(self) -> int:
        """Exchanges per network call: one per patch-parallel layer."""
        return sum(layer.count for layer in self.layers)


def _convs(pairs: Iterable[tuple[int, int]]) -> tuple[Layer, ...]:
    """Halo layers from (input channels, divisor) pairs listed in network order, equal ones merged."""
    counts: dict[tuple[int, int], int] = {}
    for c, d in pairs:
        counts[(c, d)] = counts.get((c, d), 0) + 1
    return tuple(Layer("halo", c, d, n) for (c, d), n in counts.items())


# SDXL UNet (block_out_channels 320/640/1280, transformer depths 0/2/10). Convs in network order:
# conv_in; down 0: 2 resnets + downsampler; down 1; down 2 (no downsampler); mid; up 0..2 with
# the skip-concatenated inputs, each but the last ending in an upsampler conv read at the finer
# resolution; conv_out. Resnet shortcut convs are 1x1 (no halo).
# SD1.5 and SDXL share their first two down levels (320, 640 channels) and their last three up
# levels (1280 -> 640 -> 320 with skips, upsamplers, conv_out).
_DOWN_320_640 = [(4, 1)] + [(320, 1)] * 5 + [(320, 2), (640, 2), (640, 2), (640, 2), (640, 2)]
_UP_1280_640_320 = ([(2560, 4), (1280, 4), (2560, 4), (1280, 4), (1920, 4), (1280, 4), (1280, 2)]
                    + [(1920, 2), (640, 2), (1280, 2), (640, 2), (960, 2), (640, 2), (640, 1)]
                    + [(960, 1), (320, 1), (640, 1), (320, 1), (640, 1), (320, 1)]
                    + [(320, 1)])
_SDXL_CONVS = (_DOWN_320_640
               + [(640, 4), (1280, 4), (1280, 4), (1280, 4)]
               + [(1280, 4)] * 4
               + _UP_1280_640_320)
SDXL_UNET = Inventory(
    "SDXL UNet",
    (Layer("kv", 640, 2, 10),  # 2 down x 2 + 3 up x 2 attn1 layers at level 1
     Layer("kv", 1280, 4, 60),  # 2 down x 10 + mid 10 + 3 up x 10 at level 2
     *_convs(_SDXL_CONVS),  # 40
     # 46 GroupNorms: 17 resnets x 2, 11 transformer inputs, norm_out (by resolution)
     Layer("moments", 32, 1, 11), Layer("moments", 32, 2, 15), Layer("moments", 32, 4, 20)),
    out_channels=4, note="attn1 K/V 70 layers, 40 3x3 convs, 46 GroupNorms (32 groups)")

# SD1.5 UNet (320/640/1280/1280, one transformer per attention block at levels 0-2 and mid).
_SD15_CONVS = (_DOWN_320_640
               + [(640, 4), (1280, 4), (1280, 4), (1280, 4), (1280, 4)]
               + [(1280, 8)] * 4
               + [(1280, 8)] * 4
               + [(2560, 8), (1280, 8)] * 3 + [(1280, 4)]
               + _UP_1280_640_320)
SD15_UNET = Inventory(
    "SD1.5 UNet",
    (Layer("kv", 320, 1, 5), Layer("kv", 640, 2, 5), Layer("kv", 1280, 4, 5), Layer("kv", 1280, 8, 1),
     *_convs(_SD15_CONVS),  # 52
     # 61 GroupNorms: 22 resnets x 2, 16 transformer inputs, norm_out
     Layer("moments", 32, 1, 16), Layer("moments", 32, 2, 15), Layer("moments", 32, 4, 15),
     Layer("moments", 32, 8, 15)),
    out_channels=4, note="attn1 K/V 16 layers, 52 3x3 convs, 61 GroupNorms (32 groups)")

# Flux.1: image-token K/V of 19 double + 38 single blocks, hidden 3072, one token per 2x2 latent
# patch (divisor 2). No convs or GroupNorms; the text tokens' K/V are computed on every rank.
FLUX_DIT = Inventory("Flux.1 DiT", (Layer("kv", 3072, 2, 19 + 38),), out_channels=16,
                     note="image-token K/V of 19 double + 38 single blocks; no convs or GroupNorms")

INVENTORIES: Mapping[str, Inventory] = {"sdxl": SDXL_UNET, "sd15": SD15_UNET, "flux": FLUX_DIT}


def layer_rows(rows: Sequence[int], rank: int, divisor: int) -> int:
    """A band's rows at a layer ``divisor`` times coarser (ceil, as convs do; = parallel.geometry.extent,
    repeated here so byte counting needs no torch)."""
    start = sum(rows[:rank])
    end = start + rows[rank]
    return -(-end // divisor) - -(-start // divisor)


def legacy_exchange(inv: Inventory, width: int, batch: float, dtype_bytes: int) -> dict[str, float]:
    """The flat figures the curves files and ``ExchangeCost`` use: K/V bytes per latent row of both
    branches (a row at divisor d is 1/d of a feature row of width/d tokens), halo + moment bytes
    independent of rows, one message per layer, raw output bytes per latent row."""
    per_row = fixed = 0.0
    for layer in inv.layers:
        if layer.kind == "kv":
            per_row += layer.count * (width / layer.divisor ** 2) * 2 * layer.channels * dtype_bytes * batch
        elif layer.kind == "halo":
            fixed += layer.count * layer.channels * (width / layer.divisor) * layer.rows * batch * dtype_bytes
        else:
            fixed += layer.count * 2 * layer.channels * batch * MOMENT_BYTES
    return {"bytes_per_row": per_row, "bytes_fixed": fixed, "messages": inv.messages,
            "output_bytes_per_row": inv.out_channels * width * batch * dtype_bytes,
            "convs": inv.count("halo"), "groupnorms": inv.count("moments"), "attentions": inv.count("kv")}


def _coded(values: float, channels: int, dtype_bytes: int, opts: ContextOptions | None) -> float:
    """Bytes of one payload of ``values`` values with ``channels`` channels (codecs.Codec.nbytes)."""
    if opts is None or opts.exchange in ("raw", "delta-lossless"):
        return values * dtype_bytes
    if opts.exchange == "fp8":
        return values + SCALE_BYTES * channels
    return math.ceil(values * opts.delta_bits / 8) + SCALE_BYTES * channels


@dataclass(frozen=True)
class Traffic:
    """One sync call's context among P ranks (band order): per kind, bytes and messages i -> j.

    ``gathered`` kinds travel by all-gather (a collective: done when the last member has them);
    the others point to point (each rank waits only for what it receives)."""

    bytes: Mapping[str, tuple[tuple[float, ...], ...]]
    messages: Mapping[str, tuple[tuple[int, ...], ...]]
    gathered: frozenset

    @property
    def world_size(self) -> int:
        return len(next(iter(self.bytes.values()))) if self.bytes else 0

    def sent(self, rank: int) -> dict[str, float]:
        """Bytes ``rank`` sends, per kind and in total (the byte convention of the module docstring)."""
        out = {k: float(sum(self.bytes[k][rank])) if k in self.bytes else 0.0 for k in KINDS}
        out["total"] = sum(out[k] for k in KINDS)
        return out

    def per_rank(self) -> list[dict[str, float]]:
        return [self.sent(r) for r in range(self.world_size)]


def traffic(inv: Inventory, rows: Sequence[int], width: int, batch: float = 2, dtype_bytes: int = 2,
            options: ContextOptions | None = None, *, synchronous: bool = False) -> Traffic:
    """Who sends what to whom in one sync call of bands ``rows`` (latent rows, top to bottom).

    ``batch``: samples in the call (2 with CFG; a one-branch unit 1). ``synchronous``: a warmup or
    exact call, which all-gathers everything raw whatever ``options`` says.
    """
    rows = [int(r) for r in rows]
    p = len(rows)
    if p < 1 or any(r < 1 for r in rows):
        raise PlanError(f"bands {rows} must each have at least one row")
    opts = ContextOptions() if synchronous or options is None else ContextOptions.from_dict(options)
    codec = None if synchronous else opts
    zero = lambda: [[0.0] * p for _ in range(p)]  # noqa: E731
    by = {k: zero() for k in KINDS}
    msg = {k: [[0] * p for _ in range(p)] for k in KINDS}

    def gather(kind: str, payload: float, n: int) -> None:
        for i in range(p):
            for j in range(p):
                if i != j:
                    by[kind][i][j] += payload
                    msg[kind][i][j] += n

    for layer in inv.layers:
        if layer.count == 0 or p < 2:
            continue
        cols = -(-width // layer.divisor)
        if layer.kind == "moments":
            gather("moments", layer.count * 2 * batch * layer.channels * MOMENT_BYTES, layer.count)
        elif layer.kind == "halo" and synchronous:
            values = layer.rows * cols * layer.channels * batch
            gather("halo", layer.count * _coded(values, layer.channels, dtype_bytes, codec), layer.count)
        elif layer.kind == "halo":  # displaced: the top rows to the band above, the bottom rows to the one below
            values = (layer.rows // 2) * cols * layer.channels * batch
            for i in range(p):
                for j in (i - 1, i + 1):
                    if 0 <= j < p:
                        by["halo"][i][j] += layer.count * _coded(values, layer.channels, dtype_bytes, codec)
                        msg["halo"][i][j] += layer.count
        elif not opts.partial or synchronous:
            band = max(layer_rows(rows, i, layer.divisor) for i in range(p))  # padded to the largest band
            values = band * cols * 2 * layer.channels * batch
            gather("kv", layer.count * _coded(values, 2 * layer.channels, dtype_bytes, codec), layer.count)
        else:
            for i in range(p):
                own = layer_rows(rows, i, layer.divisor)
                near = min(own, math.ceil(opts.portion * own - 1e-9))  # whole rows; 0.3 x 20 is 6, not 7
                values = near * cols * 2 * layer.channels * batch
                for j in (i - 1, i + 1):
                    if 0 <= j < p and near > 0:
                        by["kv"][i][j] += layer.count * _coded(values, 2 * layer.channels, dtype_bytes, codec)
                        msg["kv"][i][j] += layer.count
    gathered = frozenset({"moments"} | ({"halo", "kv"} if synchronous else set() if opts.partial else {"kv"}))
    freeze = lambda m: tuple(tuple(r) for r in m)  # noqa: E731
    return Traffic({k: freeze(by[k]) for k in KINDS}, {k: freeze(msg[k]) for k in KINDS}, gathered)


def call_bytes(inv: Inventory, rows: Sequence[int], width: int, batch: float = 2, dtype_bytes: int = 2,
               options: ContextOptions | None = None, *, synchronous: bool = False) -> list[dict[str, float]]:
    """Per rank: bytes sent in one sync call, by kind (kv, halo, moments) and in total."""
    return traffic(inv, rows, width, batch, dtype_bytes, options, synchronous=synchronous).per_rank()
