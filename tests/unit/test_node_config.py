"""A node advertises a backend address its peers can reach: the pure check, mesh-proxy
refusing to start without one, and the deploy/ examples passing it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from core.address import Address
from node.config import is_loopback, mesh_address_problem
from tests.unit.test_deploy import DEPLOY, exec_start
from tools.launch import ROOT, free_port

START_TIMEOUT = 30  # seconds for mesh-proxy to refuse (it must not get as far as etcd)


@pytest.mark.parametrize(("announce", "backend", "refused"), [
    ("127.0.0.1:7000", "127.0.0.1:17000", None),  # make run, umctl-mesh up, the tests
    ("[::1]:7000", "[::1]:17000", None),
    ("localhost:7000", "127.0.0.1:17000", None),
    ("127.0.0.1:7000", "10.0.0.1:17000", None),  # peers on this host reach both
    ("10.0.0.1:7000", "10.0.0.1:17000", None),  # deploy/systemd
    ("pod-0.moonmesh.ns.svc:7000", "pod-0.moonmesh.ns.svc:6379", None),  # deploy/k8s
    ("10.0.0.1:7000", "127.0.0.1:17000", "loopback"),  # every replica follows itself
    ("10.0.0.1:7000", "127.0.0.5:17000", "loopback"),
    ("[2001:db8::1]:7000", "[::1]:17000", "loopback"),
    ("pod-0.moonmesh.ns.svc:7000", "localhost:6379", "loopback"),
    ("10.0.0.1:7000", "0.0.0.0:17000", "wildcard"),
    ("0.0.0.0:7000", "10.0.0.1:17000", "wildcard"),  # --listen 0.0.0.0 and no --announce
    ("[::]:7000", "[::1]:17000", "wildcard"),
])
def test_a_loopback_backend_behind_an_address_announced_elsewhere_is_refused(
        announce, backend, refused):
    problem = mesh_address_problem(Address.parse(announce), Address.parse(backend))
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and refused in problem and "\n" not in problem


def test_mesh_proxy_refuses_to_start_with_a_loopback_backend_announced_elsewhere():
    out = subprocess.run(
        [sys.executable, "-m", "node.main", "--listen", f"127.0.0.1:{free_port()}", "--announce",
         "198.18.0.7:7000", "--backend", "127.0.0.1:6379", "--etcd", "127.0.0.1:2379"],
        capture_output=True, text=True, timeout=START_TIMEOUT, cwd=ROOT)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("mesh-proxy: error: --backend 127.0.0.1:6379 is a loopback")


def test_deploy_examples_advertise_a_backend_peers_reach():
    # systemd: Redis binds the host address the proxy advertises as its backend
    proxy = exec_start(DEPLOY / "systemd" / "mesh-proxy@.service")
    redis = exec_start(DEPLOY / "systemd" / "redis-server@.service")
    backend = proxy.split("--backend ")[1].split()[0]
    assert backend == "${HOST_IP}:1%i"
    assert "--bind 127.0.0.1 ${HOST_IP}" in " ".join(redis.split())
    host_ip = "10.0.0.1"  # as the unit's example env file says
    assert mesh_address_problem(Address.parse(f"{host_ip}:7000"),
                                Address.parse(backend.replace("${HOST_IP}", host_ip)
                                              .replace("%i", "7000"))) is None
    # Kubernetes: Redis binds the pod IP; the node advertises the pod's DNS name
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "moonmesh.yaml").read_text()))
    pod = next(d for d in docs if d and d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    args = dict(a.split("=", 1) for a in containers["mesh-proxy"]["args"] if "=" in a)
    assert not is_loopback(Address.parse(args["--backend"].replace("$(", "").replace(")", "")).host)
    redis_args = containers["redis"]["args"]
    bind = redis_args[redis_args.index("--bind") + 1:redis_args.index("--bind") + 3]
    assert bind == ["127.0.0.1", "$(POD_IP)"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} \
        in containers["redis"]["env"]
    assert "--requirepass" in redis_args and "--masterauth" in redis_args
