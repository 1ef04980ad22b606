"""`umctl-mesh serve` on a real mesh: the JSON API against what etcd holds (read through the
CLI), actions refused without the token and changing nothing, done with it; the page in a real
headless Chromium (Debian's, driven by Selenium through /usr/bin/chromedriver) showing the
slot map and nodes of the view and running a scale to its end; and `umctl-mesh up` starting
the dashboard."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import pytest

from tests.procs import free_up_ports, read_until, wait_for
from tools.launch import free_port, port_free
from tools.umctl_mesh import api
from tools.umctl_mesh.local import (
    METRICS_PORT_OFFSET,
    PLAIN_PORT_OFFSET,
    REDIS_PORT_OFFSET,
)

TOKEN = "dashboard-test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# without the background-networking flags Chromium waits on the closed network
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1700")
PAGE_TIMEOUT = 30.0  # seconds for the page to show a state


def http(url: str, method: str = "GET", body: object = None, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, object]:
    """(status, JSON document) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def serve(mesh, tmp_path: Path, token: str | None = TOKEN) -> str:  # noqa: ANN001
    """`umctl-mesh serve` on a free port of loopback (stopped with the mesh); its URL, once the
    monitor has read the mesh."""
    port = free_port()
    argv = [sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", mesh.endpoint, "serve",
            "--listen", f"127.0.0.1:{port}"]
    if token is not None:
        path = tmp_path / f"token-{port}"
        path.write_text(token + "\n")
        argv += ["--token-file", str(path)]
    mesh.spawn.launcher.process(f"serve-{port}", argv, port).start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: http(f"{url}/api/state")[1]["ready"], 15, "the monitor's first read")
    return url


def shown(mesh, name: str) -> dict:  # noqa: ANN001
    return mesh.umctl("--json", "cluster", "show", name)


def settled(mesh, name: str, shards: int) -> bool:  # noqa: ANN001
    doc = shown(mesh, name)
    return len(doc["shards"]) == shards and not doc["migrations"] and all(
        n["applied_epoch"] == doc["epoch"] for s in doc["shards"] for n in s["nodes"])


def test_the_api_reads_the_mesh_and_acts_only_with_the_token(mesh_factory, tmp_path):
    mesh = mesh_factory(4)
    mesh.wait_pool(4)
    mesh.umctl("--json", "cluster", "create", "api", "--shards", "2")
    url = serve(mesh, tmp_path)

    # reads: the view as etcd holds it, the pool as `umctl-mesh nodes` lists it
    view = shown(mesh, "api")
    status, doc = http(f"{url}/api/views/api")
    assert status == 200 and doc["epoch"] == view["epoch"]
    assert [(s["id"], s["slots"]) for s in doc["shards"]] == [
        (s["id"], s["slots"]) for s in view["shards"]]
    assert doc["config"]["password"] is False and "password_hash" not in doc["config"]
    status, cluster = http(f"{url}/api/clusters/api")
    assert status == 200 and [(s["id"], s["master"], s["slot_count"]) for s in cluster["shards"]] \
        == [(s["id"], s["nodes"][0]["node"], s["slot_count"]) for s in view["shards"]]
    nodes = {n["node"]: (n["cluster"], n["role"]) for n in mesh.umctl("--json", "nodes")}
    status, rows = http(f"{url}/api/nodes")
    assert status == 200 and {r["node"]: (r["cluster"], r["role"]) for r in rows} == nodes
    assert set(http(f"{url}/api/statuses")[1]) == set(nodes)
    assert http(f"{url}/api/clusters")[1] == [
        {"cluster": "api", "epoch": view["epoch"], "shards": 2, "nodes": 2, "migrations": 0,
         "password": False, "lost": 0, "failed": 0}]
    assert http(f"{url}/api/clusters/nosuch") == (404, {"error": "unknown cluster 'nosuch'"})
    assert http(f"{url}/api/clusters/api/migrations") == (200, [])

    # actions without the token, or with another one: refused, and etcd is as it was
    scale = f"{url}/api/clusters/api/scale"
    status, doc = http(scale, "POST", {"shards": 3})
    assert status == 401 and "needs the API token" in doc["error"]
    status, doc = http(scale, "POST", {"shards": 3}, token=TOKEN + "x")
    assert status == 401
    assert http(f"{url}/api/nodes/{next(iter(nodes))}/drain", "POST")[0] == 401
    assert shown(mesh, "api") == view
    # with it, bad requests get a clear 4xx, and nothing changes either
    assert http(scale, "POST", {"shards": "3"}, token=TOKEN) == (
        400, {"error": "shards must be an integer, got '3'"})
    status, doc = http(scale, "POST", token=TOKEN, raw=b"x" * (api.MAX_BODY_BYTES + 1))
    assert status == 413 and str(api.MAX_BODY_BYTES) in doc["error"]
    assert http(f"{url}/api/clusters/nosuch/scale", "POST", {"shards": 3}, token=TOKEN) == (
        404, {"error": "unknown cluster 'nosuch'"})
    status, doc = http(f"{url}/api/clusters/api/migrate", "POST",
                       {"slots": ["0-9"], "to": "s9"}, token=TOKEN)
    assert status == 409 and "s9" in doc["error"]
    status, doc = http(scale, "POST", {"shards": 9}, token=TOKEN)  # the pool has 2 free
    assert status == 409 and doc["error"]
    assert shown(mesh, "api") == view

    # with the token: the same scale as `cluster scale`, then done by the mesh
    status, doc = http(scale, "POST", {"shards": 3}, token=TOKEN)
    assert status == 200 and doc["shards"]["changed"] and doc["shards"]["new_shards"] == ["s3"]
    assert sum(m["slot_count"] for m in doc["shards"]["migrations"]) == 16384 // 3
    wait_for(lambda: settled(mesh, "api", 3), 60, "the scale done")
    status, doc = http(scale, "POST", {"shards": 3}, token=TOKEN)
    assert status == 200 and doc["shards"]["changed"] is False  # already so
    status, doc = http(f"{url}/api/clusters/api/cancel", "POST", {}, token=TOKEN)
    assert status == 200 and doc["changed"] is False

    # failover and drain, as the CLI's (the server has the mesh secret in its environment)
    status, doc = http(f"{url}/api/clusters/api/failover", "POST", {"shard": "s1"}, token=TOKEN)
    assert status == 409 and "replica" in doc["error"], doc  # s1 has none to promote
    last = shown(mesh, "api")["shards"][2]["nodes"][0]["node"]
    status, doc = http(f"{url}/api/nodes/{last}/drain", "POST", token=TOKEN)
    assert status == 200 and doc["how"] == "migrating" and doc["cluster"] == "api", doc
    wait_for(lambda: settled(mesh, "api", 2), 60, "the drained shard gone")

    # ops/s: commands sent to one proxy show as its rate (the others' is the mesh's own chatter)
    busy = next(n for n, (c, _) in nodes.items() if c == "api")
    stop = threading.Event()

    def load() -> None:
        with socket.create_connection(("127.0.0.1", mesh.proxies[busy].port), timeout=5) as s:
            while not stop.is_set():
                s.sendall(b"PING\r\n" * 100)
                got = b""
                while got.count(b"+PONG\r\n") < 100:
                    got += s.recv(65536)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_for(lambda: any(r["node"] == busy and (r["ops_per_sec"] or 0) > 1000
                             for r in http(f"{url}/api/state")[1]["nodes"]), 15,
                 f"{busy}'s ops/s over 1000")
    finally:
        stop.set()
        thread.join(10)

    # a second server on the same port says it cannot listen there (1)
    taken = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", mesh.endpoint,
                            "serve", "--listen", url.removeprefix("http://")],
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 1 and f"cannot listen on {url.removeprefix('http://')}" \
        in taken.stderr, taken.stderr

    # a server with no token refuses every action, and says why; reads still work
    readonly = serve(mesh, tmp_path, token=None)
    status, doc = http(f"{readonly}/api/clusters/api/scale", "POST", {"shards": 2}, token=TOKEN)
    assert status == 403 and "no API token" in doc["error"]
    assert http(f"{readonly}/api/clusters/api")[0] == 200
    assert http(f"{readonly}/api/state")[1]["auth"] == {"token_configured": False,
                                                        "token_valid": False}


def status_for_host(port: int, host: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of a request to 127.0.0.1:`port` whose Host header says `host`."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None,
                     headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_only_the_loopback_names_reach_a_loopback_server(spawn):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends
    `Host: evil.example`; it gets 400, while 127.0.0.1, localhost and ::1 (any port) work."""
    etcd = spawn.etcd()[0]
    port = free_port()
    spawn.launcher.process(f"serve-{port}", [
        sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", etcd.addr, "serve",
        "--listen", f"127.0.0.1:{port}"], port).start()
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "localhost.evil.example", "mesh"]:
        for method, path in [("GET", "/"), ("GET", "/api/state"),
                             ("POST", "/api/clusters")]:
            assert status_for_host(port, host, path, method)[0] == 400, (host, path)
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 f"LOCALHOST:{port}"]:
        status, body = status_for_host(port, host, "/")
        assert status == 200 and b"<title>Moonmesh</title>" in body, host
        status, body = status_for_host(port, host, "/api/state")
        assert status == 200 and "ready" in json.loads(body), host
    refused = subprocess.run([sys.executable, "-m", "tools.umctl_mesh.cli", "--etcd", etcd.addr,
                              "serve", "--listen", f"127.0.0.1:{free_port()}", "--allow-host",
                              "mesh.example"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--allow-host is for a server off loopback" \
        in refused.stderr, refused.stderr


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


SEGMENTS = """return [...document.querySelectorAll('.slotmap[data-cluster="ui"] .seg')]
              .map(e => [e.dataset.shard, +e.dataset.start, +e.dataset.end]);"""
NODES = """return [...document.querySelectorAll('#hosts tr[data-node]')]
           .map(e => [e.dataset.node, e.dataset.role]);"""


def slot_map(view: dict) -> list[list]:
    return sorted([s["id"], a, b] for s in view["shards"] for a, b in s["slots"])


def test_the_page_shows_the_view_and_scales_a_cluster(mesh_factory, tmp_path, browser):
    from redis.cluster import RedisCluster
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    mesh = mesh_factory(3)
    mesh.wait_pool(3)
    mesh.umctl("--json", "cluster", "create", "ui", "--shards", "2")
    view = shown(mesh, "ui")
    rc = RedisCluster(host="127.0.0.1", port=int(view["shards"][0]["nodes"][0]["proxy"]
                                                 .rpartition(":")[2]))
    for i in range(2000):  # keys for the scale to move
        rc.set(f"ui:{i}", i)
    url = serve(mesh, tmp_path)
    wait = WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.1)

    browser.get(url + "/")
    # the slot map and the pool, as etcd holds them
    wait.until(lambda d: sorted(d.execute_script(SEGMENTS)) == slot_map(view))
    nodes = mesh.umctl("--json", "nodes")
    wait.until(lambda d: sorted(map(tuple, d.execute_script(NODES))) == sorted(
        (n["node"], n["role"]) for n in nodes))
    assert browser.find_element(By.ID, "auth").get_attribute("data-state") == "none"

    # the token entered in the page, then a scale to 3 shards from the cluster's form
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-use").click()
    wait.until(lambda d: d.find_element(By.ID, "auth").get_attribute("data-state") == "valid")
    browser.find_element(By.ID, "scale-shards-ui").send_keys("3")
    browser.find_element(By.ID, "scale-ui").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#actions li")
               .get_attribute("data-state") == "finished")
    action = browser.find_element(By.CSS_SELECTOR, "#actions li").text
    assert re.fullmatch(r"scale ui \(shards 3\): finished at epoch \d+", action), action
    after = shown(mesh, "ui")
    assert len(after["shards"]) == 3 and not after["migrations"]
    wait.until(lambda d: sorted(d.execute_script(SEGMENTS)) == slot_map(after))
    wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, '.migrations[data-cluster="ui"]').get_attribute("data-count") == "0")
    assert browser.find_element(By.CSS_SELECTOR, '.cluster[data-cluster="ui"]') \
        .get_attribute("data-epoch") == str(after["epoch"])
    wait.until(lambda d: all(r[1] == "master" for r in d.execute_script(NODES)))
    assert [rc.get(f"ui:{i}") for i in range(0, 2000, 97)] == [
        str(i).encode() for i in range(0, 2000, 97)]
    rc.close()
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_up_starts_the_dashboard(tmp_path):
    """`umctl-mesh up` (so `make run`) prints the dashboard's URL; the page and the API answer
    there, and the token file it names allows actions."""
    env = {k: v for k, v in os.environ.items() if k not in ("MOONMESH_ETCD", "MOONMESH_API_TOKEN")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    port, dashboard = free_up_ports(1), 0
    taken = (0, REDIS_PORT_OFFSET, PLAIN_PORT_OFFSET, METRICS_PORT_OFFSET)  # up's, from PORT
    while dashboard == 0 or dashboard in {port + off for off in taken}:
        dashboard = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.umctl_mesh.cli", "up", "--shards", "1",
                             "--replicas", "0", "--port", str(port), "--dashboard-port",
                             str(dashboard)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        lines = read_until(proc, "dashboard:")
        match = re.fullmatch(r"dashboard: +(http://127\.0\.0\.1:(\d+)/) +\(actions need the token "
                             r"in (\S+)\)\n", lines[-1])
        assert match and int(match.group(2)) == dashboard, "".join(lines)
        url, token = match.group(1), Path(match.group(3)).read_text().strip()
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"<title>Moonmesh</title>" in page.read()
        assert [c["cluster"] for c in http(url + "api/clusters")[1]] == ["mydb"]
        dry = {"shards": 1, "replicas": 0, "dry_run": True}
        assert http(url + "api/clusters/mydb/scale", "POST", dry)[0] == 401
        status, doc = http(url + "api/clusters/mydb/scale", "POST", dry, token=token)
        assert status == 200 and doc["shards"]["changed"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    assert port_free(dashboard)
