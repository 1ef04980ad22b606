"""Hosts as Linux network namespaces on one bridge, and partitions between them.

`Network(run_id)` creates a "switch" namespace holding a bridge, and one namespace per host,
each joined to the bridge by a veth pair, with an address from 198.18.0.0/15 (reserved for
benchmark networks) and its own loopback. Nothing is in the machine's own namespace: no
uplink, no default route, no forwarding (set off in every namespace), so nothing leaves the
machine and the host's firewall plays no part. Names carry the run id, so runs never meet, and
`close()` deletes every namespace (which deletes the veths and the bridge with them).

Partitions are nft rules in a table of our own inside each host's namespace (`drop` on input
and/or output for the other side's addresses); packet loss is the same with `numgen random`
dropping a share of the packets (nft needs no kernel module that might be missing, as netem's
is on some kernels); latency is a tc netem qdisc on a host's interface. `heal()` deletes the
tables and the qdiscs.

Processes enter a namespace with setns(2) before exec (`enter`), and this process's own
threads can open sockets inside one (`inside`): a socket belongs to the namespace of the thread
that created it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
SUBNET = "198.18.0.0/15"
NFT_TABLE = "moonmesh_chaos"
PREFIX = "mmc"  # of every namespace a run makes: mmc<run id><host>
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(Exception):
    """This machine cannot create network namespaces (not root, no iproute2, a container)."""


def run(*argv: str, ns: str | None = None, check: bool = True, input: str | None = None,
        timeout: float = 10) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    out = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def setns(ns: str) -> None:
    """Move the calling thread into namespace `ns` (by name, as `ip netns` made it)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block's socket creation in namespace `ns` (this thread only), then return."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(ns)
        try:
            yield
        finally:
            _setns_fd(home)
    finally:
        os.close(home)


def enter(ns: str):  # noqa: ANN201
    """A `preexec_fn` that moves the child into `ns` before it execs."""
    return lambda: setns(ns)


def check_available(nft: bool = True) -> None:
    """Raise `NetnsUnavailable` with a one-line reason if namespaces (and, with `nft`,
    partitions inside them) cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
    for tool in ("ip", "nft") if nft else ("ip",):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` is not installed (make chaos installs iproute2 "
                                   "and nftables from Debian)")
    probe = f"mmprobe{os.getpid()}"
    out = run("ip", "netns", "add", probe, check=False)
    if out.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {out.stderr.strip()}")
    try:
        listed = run("nft", "list", "ruleset", ns=probe, check=False) if nft else None
        if listed is not None and listed.returncode != 0:
            raise NetnsUnavailable(f"nft does not work inside a namespace: "
                                   f"{listed.stderr.strip()}")
    finally:
        run("ip", "netns", "del", probe, check=False)


@dataclass
class Host:
    name: str  # short name in the run (etcd0, n1, client)
    ns: str  # namespace name
    ip: str
    veth: str  # the end in the switch namespace


def netem_available() -> str:
    """Empty if tc netem works in a namespace here, else why not (one line)."""
    if shutil.which("tc") is None:
        return "`tc` is not installed (iproute2)"
    probe = f"mmprobe{os.getpid()}"
    out = run("ip", "netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    try:
        run("ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1", ns=probe)
        added = run("tc", "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms",
                    ns=probe, check=False)
        if added.returncode != 0:
            return (f"tc netem does not work here ({added.stderr.strip()}: the kernel has no "
                    "sch_netem module)")
        return ""
    finally:
        run("ip", "netns", "del", probe, check=False)


@dataclass
class Network:
    run_id: str
    hosts: dict[str, Host] = field(default_factory=dict)
    closed: bool = False
    delayed: set[str] = field(default_factory=set)  # hosts with a netem qdisc

    def __post_init__(self) -> None:
        self.switch = f"{PREFIX}{self.run_id}sw"
        run("ip", "netns", "add", self.switch)
        try:
            self._sysctls(self.switch)
            run("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
            run("ip", "link", "set", "br0", "up", ns=self.switch)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _sysctls(ns: str) -> None:
        for key in ("net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"):
            run("sysctl", "-qw", key, ns=ns, check=False)

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 10
        host = Host(name, f"{PREFIX}{self.run_id}{name}", f"198.18.0.{index}", f"v{index}")
        self.hosts[name] = host
        run("ip", "netns", "add", host.ns)
        self._sysctls(host.ns)
        # the pair is made in the host's namespace; its peer goes to the switch
        run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", host.veth, ns=host.ns)
        run("ip", "link", "set", host.veth, "netns", self.switch, ns=host.ns)
        run("ip", "link", "set", host.veth, "master", "br0", ns=self.switch)
        run("ip", "link", "set", host.veth, "up", ns=self.switch)
        run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0", ns=host.ns)
        run("ip", "link", "set", "eth0", "up", ns=host.ns)
        run("ip", "link", "set", "lo", "up", ns=host.ns)
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # ------------------------------------------------------------------ partitions

    def block(self, host: str, others: Iterable[str], inbound: bool = True,
              outbound: bool = True) -> None:
        """Drop what `host` receives from (`inbound`) and/or sends to (`outbound`) `others`."""
        addrs = sorted({self.hosts[o].ip for o in others if o != host})
        if not addrs:
            return
        h = self.hosts[host]
        rules = [f"add table inet {NFT_TABLE}",
                 f"add chain inet {NFT_TABLE} input {{ type filter hook input priority -10; }}",
                 f"add chain inet {NFT_TABLE} output {{ type filter hook output priority -10; }}"]
        s = "{ " + ", ".join(addrs) + " }"
        if inbound:
            rules.append(f"add rule inet {NFT_TABLE} input ip saddr {s} drop")
        if outbound:
            rules.append(f"add rule inet {NFT_TABLE} output ip daddr {s} drop")
        run("nft", "-f", "-", ns=h.ns, input="\n".join(rules) + "\n")

    def block_port(self, host: str, others: Iterable[str], port: int) -> None:
        """Drop the TCP connections `others` open to `port` on `host` (one service cut off,
        the host's others reachable)."""
        addrs = sorted({self.hosts[o].ip for o in others if o != host})
        if not addrs:
            return
        s = "{ " + ", ".join(addrs) + " }"
        rules = [f"add table inet {NFT_TABLE}",
                 f"add chain inet {NFT_TABLE} input {{ type filter hook input priority -10; }}",
                 f"add rule inet {NFT_TABLE} input ip saddr {s} tcp dport {port} drop"]
        run("nft", "-f", "-", ns=self.hosts[host].ns, input="\n".join(rules) + "\n")

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every group off from every other (both ways); hosts in no group are untouched."""
        sets = [set(g) for g in groups]
        for i, g in enumerate(sets):
            others = set().union(*(s for j, s in enumerate(sets) if j != i))
            for h in g:
                self.block(h, others)

    def lossy(self, host: str, others: Iterable[str], percent: int) -> None:
        """Drop `percent`% of the packets `host` exchanges with `others`, each way."""
        addrs = sorted({self.hosts[o].ip for o in others if o != host})
        s = "{ " + ", ".join(addrs) + " }"
        chance = f"numgen random mod 100 < {percent} drop"
        rules = [f"add table inet {NFT_TABLE}",
                 f"add chain inet {NFT_TABLE} input {{ type filter hook input priority -10; }}",
                 f"add chain inet {NFT_TABLE} output {{ type filter hook output priority -10; }}",
                 f"add rule inet {NFT_TABLE} input ip saddr {s} {chance}",
                 f"add rule inet {NFT_TABLE} output ip daddr {s} {chance}"]
        run("nft", "-f", "-", ns=self.hosts[host].ns, input="\n".join(rules) + "\n")

    def delay(self, host: str, ms: int, jitter_ms: int) -> None:
        """Delay every packet `host` sends by `ms` +- `jitter_ms` (tc netem on its interface)."""
        run("tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", f"{ms}ms",
            f"{jitter_ms}ms", ns=self.hosts[host].ns)
        self.delayed.add(host)

    def heal(self) -> None:
        for h in self.hosts.values():
            run("nft", "delete", "table", "inet", NFT_TABLE, ns=h.ns, check=False)
        for name in sorted(self.delayed):
            run("tc", "qdisc", "del", "dev", "eth0", "root", ns=self.hosts[name].ns, check=False)
        self.delayed.clear()

    def rules(self, host: str) -> str:
        return run("nft", "list", "ruleset", ns=self.hosts[host].ns, check=False).stdout

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for h in list(self.hosts.values()) + [Host("switch", self.switch, "", "")]:
            run("ip", "netns", "del", h.ns, check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def leftovers(run_id: str = "") -> list[str]:
    """Namespaces of chaos runs still present (of one run, or of any)."""
    out = run("ip", "netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}{run_id}")]


def remove_leftovers() -> list[str]:
    """Delete the namespaces runs left behind (a run killed by SIGKILL cannot clean up)."""
    gone = leftovers()
    for ns in gone:
        run("ip", "netns", "del", ns, check=False)
    return gone
