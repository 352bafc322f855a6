"""The planner's choice across a shaped and an unshaped link, with a second host made on this machine.

    sudo python -m stadi_core bench-two-hosts [--out docs/bench_two_hosts_netns.txt]

Needs root (a network namespace joined by a veth pair, bench/netns.py). For each link -- shaped with tc
to 1 Gbit/s (plus 1 ms where the kernel has netem), then unshaped -- it starts a remote CPU worker in the
namespace (``python -m stadi_core worker --join``), lets it join a fresh coordinator lobby (which
measures the link), and runs ``generate(strategy="auto")`` on one local + the remote worker: the
devices' speeds are measured, the context bytes counted on the model, and the planner prices every
arrangement on the measured link. Printed: the link, the plan with its candidates, the run's table.

Then the same measured link under GPU-class compute (bench/gpu_class_curves.json, ILLUSTRATIVE: one
RTX 4090 class GPU on each side of the link), SDXL and Flux 1024^2: which arrangement the planner would
pick there (predicted, not measured). On this 2-core machine both "hosts" share the same cores, so the
CPU run's own choice mostly reflects compute; the link decides in the GPU-class tables.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from ..arrange import choose_plan
from ..cluster import ClusterSpec
from .netns import Unavailable, make_two_hosts

TOKEN = "bench-two-hosts"


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _gpu_class(lobby, remote: str) -> str:
    """The planner's choice for one RTX 4090 class GPU per side of the measured link (illustrative curves)."""
    from .arrangements import load_workloads

    out = []
    devices = ["cuda:0", f"{remote}/cuda:0"]
    link = lobby.link_model(devices)
    for w in load_workloads():
        curve = w.curves["rtx4090"]
        choice = choose_plan(w.height, [curve.speed(w.height / 2)] * 2, devices=devices, strategy="auto",
                             branches=w.branches, compute_s=lambda d, rows, c=curve: c(rows), link=link,
                             exchange=w.exchange, align=w.align, steps=w.steps, warmup=2, mode="displaced")
        out.append(f"  {w.title}, 2 x RTX 4090 class (one per host), displaced -> {choice.candidates[0].name}")
        out.extend("    " + line for line in choice.table().splitlines())
    return "\n".join(out)


def one_link(hosts, shaped: bool, args) -> str:
    from ..api import generate
    from ..models.spec import model_spec_for
    from ..planner import Plan
    from ..runtime.lobby import close_lobbies, open_lobby
    from ..runtime.registry import shutdown_pools

    hosts.shape(shaped)
    address = f"{hosts.coordinator_ip}:{_free_port(hosts.coordinator_ip)}"
    lobby = open_lobby(address, TOKEN)
    env = dict(os.environ, STADI_TOKEN=TOKEN,
               PYTHONPATH=os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(os.path.dirname(
                   os.path.abspath(__file__)))), os.environ.get("PYTHONPATH")] if p))
    cmd = hosts.remote_cmd([sys.executable, "-m", "stadi_core", "worker", "--join", address, "--devices", "cpu:1",
                            "--threads", "1"])
    remote = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    hosts.procs.append(remote)
    try:
        lobby.wait_for(1, 120)
        t0 = time.perf_counter()
        res = generate(model_spec_for(args.model), ClusterSpec.parse("cpu:0", backend="gloo"), height=args.height,
                       width=args.width, batch=1, steps=args.steps, cfg=args.cfg, seed=0, mode="displaced",
                       strategy="auto", listen=address, token=TOKEN, remote_workers=1, threads_per_worker=1)
        wall = time.perf_counter() - t0
        link = lobby.links[hosts.remote_ip]
        lines = [f"== link {'shaped: ' + hosts.shaping if shaped else 'unshaped (veth)'}",
                 f"measured at join: {link.describe()}",
                 f"-- the run ({args.model}, latent {args.height}x{args.width}, {args.steps} steps, cfg {args.cfg}, "
                 f"strategy auto; {wall:.1f} s with speed measurement and worker start)",
                 Plan.from_dict(res.report.plan).describe(), res.report.table(),
                 "-- the same link, GPU-class compute (ILLUSTRATIVE curves; predicted, not measured):",
                 _gpu_class(lobby, hosts.remote_ip)]
        return "\n".join(lines)
    finally:
        close_lobbies()
        shutdown_pools()
        if remote.poll() is None:
            os.killpg(remote.pid, 9)
        remote.wait(10)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stadi_core bench-two-hosts", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--out", help="also write the output to this file")
    args = ap.parse_args(argv)
    try:
        hosts = make_two_hosts("b")
    except Unavailable as exc:
        print(f"bench-two-hosts: {exc}", file=sys.stderr)
        return 2
    try:
        head = ["STADI bench-two-hosts: one local + one remote CPU worker; the remote in a network namespace "
                f"({hosts.remote_ip}) joined over a veth pair; the coordinator at {hosts.coordinator_ip}."]
        if not hosts.delay_shaped:
            head.append(f"note: {hosts.no_delay_reason}")
        parts = [one_link(hosts, True, args), one_link(hosts, False, args)]
    finally:
        hosts.close()
    text = "\n\n".join(["\n".join(head)] + parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
