"""``python -m stadi_core train-tiny``: train the tiny-shapes model on this machine's CPU.

Reproducible from the seed and step count: the data is procedural (tiny_shapes_data), the
network is initialised from the seed, and batches are drawn from one generator. Writes the
weights (safetensors) with a JSON sidecar (sha256, config, training settings, held-out loss
of the trained and the untrained network), the loss curve and sample grids at the training
size and at twice its height. ``--ship`` copies the weights into the package and the PNGs
into docs/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from .models import tiny_shapes
from .models.tiny_shapes_data import ANY, NULL, VOCAB, scenes, tokenize
from .sampling.schedule import DiscreteSchedule

DOCS = Path(__file__).resolve().parent.parent / "docs"
GRID_CAPTIONS = ("red circle sky clear", "blue square horizon clear", "yellow triangle flat stripes",
                 "white circle horizon stripes", "green square sky stripes", "purple triangle sky clear",
                 "red square flat clear", "blue circle flat stripes")


def alphas_cumprod() -> torch.Tensor:
    """The DDPM schedule the engine samples with (EpsDiscrete's), as alpha-bar per timestep."""
    return (1.0 / (1.0 + DiscreteSchedule().sigmas ** 2)).float()


def batch(n: int, height: int, width: int, gen: torch.Generator, drop: float = 0.12, open_slot: float = 0.12):
    """Pictures and caption ids; ``drop`` of captions become null (CFG), ``open_slot`` of slots "any"."""
    x0, captions = scenes(n, height, width, generator=gen)
    ids = torch.tensor([tokenize(c) for c in captions])
    opened = torch.rand(ids.shape, generator=gen) < open_slot
    ids = torch.where(opened, torch.full_like(ids, VOCAB.index(ANY)), ids)
    dropped = torch.rand(n, generator=gen) < drop
    ids[dropped] = VOCAB.index(NULL)
    return x0, ids


def noised(x0: torch.Tensor, gen: torch.Generator, abar: torch.Tensor, t: torch.Tensor | None = None):
    n = x0.shape[0]
    t = torch.randint(0, len(abar), (n,), generator=gen) if t is None else t
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].view(n, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def loss_of(unet, text, xt, t, ids, eps) -> torch.Tensor:
    out = unet(xt, t, encoder_hidden_states=text(ids), return_dict=False)[0]
    return (out - eps).pow(2).mean()


def held_out(unet, text, n: int = 192, seed: int = 12345) -> float:
    """Denoising loss on a fixed batch (timesteps spread evenly over the schedule)."""
    gen = torch.Generator().manual_seed(seed)
    abar = alphas_cumprod()
    x0, ids = batch(n, 32, 32, gen, drop=0.0, open_slot=0.0)
    t = torch.linspace(0, len(abar) - 1, n).round().long()
    xt, t, eps = noised(x0, gen, abar, t)
    with torch.no_grad():
        return float(sum(loss_of(unet, text, xt[i:i + 64], t[i:i + 64], ids[i:i + 64], eps[i:i + 64]) * len(t[i:i + 64])
                         for i in range(0, n, 64)) / n)


def fresh(seed: int):
    torch.manual_seed(seed)
    return tiny_shapes.build(tiny_shapes.CONFIG), tiny_shapes.CaptionEncoder()


def train(args) -> Path:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unet, text = fresh(args.seed)
    untrained = held_out(unet, text)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    abar = alphas_cumprod()
    curve, smooth, t0 = [], None, time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        tall = step % 4 == 3  # every fourth batch a canvas twice as tall: bands need height
        x0, ids = batch(args.batch // 2 if tall else args.batch, 64 if tall else 32, 32, gen)
        xt, t, eps = noised(x0, gen, abar)
        loss = loss_of(unet, text, xt, t, ids, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (text, ema_text)):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if step % 25 == 0 or step == args.steps - 1:
            curve.append((step + 1, smooth))
            done = (step + 1) / args.steps
            took = time.perf_counter() - t0
            bar = "#" * int(30 * done)
            print(f"\r[{bar:<30}] step {step + 1}/{args.steps} loss {smooth:.4f} lr {lr:.2e} "
                  f"{took / 60:.1f} min, ~{took / done / 60 - took / 60:.1f} min left", end="", flush=True)
    print()
    trained = held_out(ema_unet, ema_text)
    weights = out / tiny_shapes.WEIGHTS.name
    from safetensors.torch import save_file

    state = {f"unet.{k}": v.contiguous() for k, v in ema_unet.state_dict().items()}
    state.update({f"text.{k}": v.contiguous() for k, v in ema_text.state_dict().items()})
    save_file(state, str(weights))
    meta = dict(sha256=tiny_shapes.sha256(weights), config=tiny_shapes.CONFIG, seed=args.seed, steps=args.steps,
                batch=args.batch, lr=args.lr, ema=args.ema, minutes=round((time.perf_counter() - t0) / 60, 1),
                held_out_loss=trained, untrained_held_out_loss=untrained, loss_ratio=trained / untrained,
                parameters=sum(v.numel() for v in state.values()))
    tiny_shapes.sidecar(weights).write_text(json.dumps(meta, indent=1, default=list))
    print(f"held-out denoising loss: trained {trained:.4f}, untrained {untrained:.4f} (ratio {trained / untrained:.3f})")
    from .pictures import line_chart

    line_chart({"training loss (smoothed)": curve}, f"tiny-shapes training, seed {args.seed}, batch {args.batch}").save(
        out / "tiny_shapes_loss.png")
    write_sample_grids(weights, out)
    print(f"wrote {weights}, {tiny_shapes.sidecar(weights).name}, tiny_shapes_loss.png, tiny_shapes_samples*.png in {out}")
    if args.ship:
        ship(out)
    return weights


def write_sample_grids(weights: Path, out: Path, steps: int = 20) -> None:
    """Samples of every grid caption at 32x32 and at 64x32 (twice the training height)."""
    from .api import reference_generate
    from .models.spec import ModelSpec
    from .pictures import grid, image

    spec = ModelSpec(family="tiny-shapes", config="tiny-shapes", extra={"weights": str(weights)})
    tiny_shapes.load_state.cache_clear()
    tiny_shapes.caption_encoder.cache_clear()
    for name, height in (("tiny_shapes_samples.png", 32), ("tiny_shapes_samples_tall.png", 64)):
        pics = [image(tiny_shapes.to_rgb(reference_generate(spec, height=height, width=32, steps=steps,
                                                             sampler="dpmpp_2m", cfg=4.0, seed=i, prompt=c))[0], 3)
                for i, c in enumerate(GRID_CAPTIONS)]
        grid(pics, cols=4, captions=list(GRID_CAPTIONS)).save(out / name)


def ship(out: Path) -> None:
    dest = tiny_shapes.WEIGHTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = out / dest.name
    shutil.copyfile(src, dest)
    shutil.copyfile(tiny_shapes.sidecar(src), tiny_shapes.sidecar(dest))
    for png in out.glob("tiny_shapes_*.png"):
        shutil.copyfile(png, DOCS / png.name)
    print(f"shipped {dest} and the PNGs to {DOCS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stadi_core train-tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="train_out")
    p.add_argument("--ship", action="store_true", help="copy the weights into the package and the PNGs into docs/")
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
