"""What every measured CPU bench shares: its command line (model, latent size, steps, cfg, seed,
--out) and printing its table (and writing it to --out)."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Callable


def parser(command: str, doc: str, *, model: str, height: int, width: int, steps: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m stadi_core {command}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model)
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="synchronous steps before displaced context")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this file")
    return p


def emit(p: argparse.ArgumentParser, argv, make_table: Callable[[argparse.Namespace], str]) -> int:
    """Parse ``argv``, print ``make_table(args)`` and write it to ``--out`` when given."""
    args = p.parse_args(argv)
    text = make_table(args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


@contextlib.contextmanager
def env_settings(values: dict[str, str]):
    """``os.environ.update(values)`` for the runs started inside (pools and runs read these when they
    start), then the caller's values back."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
