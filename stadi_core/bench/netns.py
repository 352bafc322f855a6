"""A second host made on this machine (tests/test_remote_join.py, bench-two-hosts): a network namespace
with its own address, joined to the root namespace by a veth pair whose both ends are shaped with tc
(1 Gbit/s; 1 ms delay where netem exists -- elsewhere bench/delay_relay.py can add the delay in user
space on the connections that need it).

``make_two_hosts()`` returns a ``TwoHosts`` or raises ``Unavailable`` with the reason (not root, no
``ip``/``tc``, namespaces refused); ``TwoHosts.close()`` removes everything, whatever state it is in.
Processes for the second host run with ``ip netns exec`` (``TwoHosts.remote_cmd``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

RATE = "1gbit"
RATE_GBPS = 0.125  # GB/s (1e9 bytes/s) of 1 Gbit/s
DELAY_MS = 1.0
NET = "10.77.0"


class Unavailable(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@dataclass
class TwoHosts:
    ns: str
    veth: str  # root-namespace end
    peer: str  # the namespace's end
    coordinator_ip: str = f"{NET}.1"
    remote_ip: str = f"{NET}.2"
    shaping: str = ""  # the tc qdisc used on both ends
    delay_shaped: bool = False  # netem delay applied (else only the rate: tbf)
    no_delay_reason: str = ""
    procs: list = field(default_factory=list)

    def remote_cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def shape(self, shaped: bool) -> None:
        """Shape both ends (``RATE``, ``DELAY_MS`` where netem exists) or remove the shaping."""
        for prefix, dev in (([], self.veth), (["ip", "netns", "exec", self.ns], self.peer)):
            subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=20)
            if not shaped:
                continue
            qdisc = (["netem", "rate", RATE, "delay", f"{DELAY_MS:g}ms", "limit", "10000"] if self.delay_shaped else
                     ["tbf", "rate", RATE, "burst", "256kb", "latency", "50ms"])
            out = subprocess.run(prefix + ["tc", "qdisc", "add", "dev", dev, "root", *qdisc], capture_output=True,
                                 text=True, timeout=20)
            if out.returncode:
                raise Unavailable(f"tc qdisc add {' '.join(qdisc)} on {dev} failed: {out.stderr.strip()}")
        self.shaping = " ".join(qdisc) if shaped else "none"

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except OSError:
                    pass
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.ns, check=False)


def make_two_hosts(tag: str | None = None) -> TwoHosts:
    if os.geteuid() != 0:
        raise Unavailable("needs root to make a network namespace and a veth pair")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise Unavailable(f"needs the `{tool}` command (iproute2)")
    tag = tag or str(os.getpid())
    hosts = TwoHosts(ns=f"stadi{tag}", veth=f"stv{tag}a"[:15], peer=f"stv{tag}b"[:15])
    try:
        _ip("netns", "add", hosts.ns)
        _ip("link", "add", hosts.veth, "type", "veth", "peer", "name", hosts.peer)
        _ip("link", "set", hosts.peer, "netns", hosts.ns)
        _ip("addr", "add", f"{hosts.coordinator_ip}/24", "dev", hosts.veth)
        _ip("link", "set", hosts.veth, "up")
        for args in (("addr", "add", f"{hosts.remote_ip}/24", "dev", hosts.peer), ("link", "set", hosts.peer, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", hosts.ns, "ip", *args)
    except subprocess.CalledProcessError as exc:
        hosts.close()
        raise Unavailable(f"could not make the second host ({' '.join(exc.cmd)}: {exc.stderr.strip()})") from None
    probe = subprocess.run(["tc", "qdisc", "add", "dev", hosts.veth, "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True, timeout=20)
    hosts.delay_shaped = probe.returncode == 0
    if not hosts.delay_shaped:
        hosts.no_delay_reason = (f"this kernel has no netem qdisc ({probe.stderr.strip()}): the link is shaped to "
                                 f"{RATE} with tbf, without the {DELAY_MS:g} ms delay")
    try:
        hosts.shape(True)
    except Unavailable:
        hosts.close()
        raise
    return hosts
