"""deploy/ examples use only flags that mesh-proxy and etcd really have, and parse."""
from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import yaml

from node.main import build_parser
from tools.launch import etcd_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")


def mesh_proxy_flags() -> set[str]:
    return {opt for action in build_parser()._actions for opt in action.option_strings}


def etcd_flags() -> set[str]:
    out = subprocess.run([etcd_binary(), "--help"], capture_output=True, text=True).stdout
    return set(FLAG.findall(out))


def exec_start(unit: Path) -> str:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    return parser["Service"]["ExecStart"].replace("\\\n", " ").replace("\\", " ")


def test_systemd_units_use_known_flags():
    proxy = exec_start(DEPLOY / "systemd" / "mesh-proxy@.service")
    assert proxy.split()[0].endswith("mesh-proxy")
    used = set(FLAG.findall(proxy))
    assert used <= mesh_proxy_flags(), used - mesh_proxy_flags()
    assert {"--listen", "--backend", "--etcd", "--announce"} <= used
    etcd = exec_start(DEPLOY / "systemd" / "etcd-member.service")
    assert set(FLAG.findall(etcd)) <= etcd_flags()


def test_kubernetes_manifests_parse_and_use_known_flags():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert ("StatefulSet", "etcd") in kinds and ("StatefulSet", "moonmesh") in kinds
    containers = {c["name"]: c for d in docs if d["kind"] == "StatefulSet"
                  for c in d["spec"]["template"]["spec"]["containers"]}
    assert {"etcd", "redis", "mesh-proxy"} <= set(containers)
    proxy_args = {a.split("=")[0] for a in containers["mesh-proxy"]["args"]}
    assert proxy_args <= mesh_proxy_flags(), proxy_args - mesh_proxy_flags()
    etcd_args = {a.split("=")[0] for a in containers["etcd"]["args"]}
    assert etcd_args <= etcd_flags(), etcd_args - etcd_flags()
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd")
    assert sts["spec"]["replicas"] == 3
    # every pod of the pool runs the proxy beside its own Redis
    pool = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "moonmesh")
    names = [c["name"] for c in pool["spec"]["template"]["spec"]["containers"]]
    assert names == ["redis", "mesh-proxy"]
    backend = next(a for a in containers["mesh-proxy"]["args"] if a.startswith("--backend="))
    assert backend.endswith(":" + containers["redis"]["args"][1])
