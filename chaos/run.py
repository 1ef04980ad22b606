"""Rounds of faults under load, then the history check: `python -m chaos.run` (`make chaos`).

One run: namespaces and processes up (chaos/hosts.py), a cluster created with umctl-mesh, the
client load started, then `rounds` times: a fault chosen by the seeded generator, held for its
time, healed, and the mesh waited for (every node alive and on the current view, operations
succeeding again). Then every key is read once more, the history is checked, and a table says,
per kind of fault, how often it ran, what the clients saw and what the checker found. The seed
and the run's directory (logs, history.jsonl, report.txt) are printed; the directory is kept
when something was found. Everything is torn down at the end, also on failure or Ctrl-C.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from chaos import linearizable, netns
from chaos.history import KINDS, Anomaly, History, Report, check
from chaos.hosts import PROXY_PORT, Deployment
from chaos.nemesis import MIGRATION_RATE, PARTITIONS, Fault, Nemesis
from chaos.workload import KINDS as WORKLOADS
from chaos.workload import Workload

CLUSTER = "chaos"


@dataclass
class Config:
    seed: int
    rounds: int = 10
    faults: tuple[str, ...] = Nemesis.KINDS
    shards: int = 2
    replicas: int = 1
    spare: int = 0  # free nodes in the pool
    min_replicas_ack: int = 0
    threads: int = 4
    keys: int = 8  # list keys live at a time, and registers
    workload: str = "append"  # "append" | "register" | "both"
    warmup: float = 2.0  # seconds of load before the first fault
    recover_timeout: float = 60.0
    wait_sync: bool = True  # start each fault only once every replica finished syncing
    time_limit: float = 1800.0  # no new round starts after this many seconds
    workdir: Path | None = None
    keep: bool = False
    log: bool = True


@dataclass
class Round:
    index: int
    fault: Fault
    start: float
    healed: float = 0.0
    end: float = 0.0
    recovered: bool = True
    note: str = ""
    ok: int = 0
    failed: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    before: str = ""  # the cluster's epoch and masters when the fault started
    after: str = ""  # ... and once the mesh recovered
    reported_lost: list[str] = field(default_factory=list)  # new entries of the view's `lost`


@dataclass
class Result:
    config: Config
    run_id: str
    workdir: Path
    rounds: list[Round]
    report: Report
    unread: list[str]
    dead: list[str]
    seconds: float
    history: History
    verdicts: list[linearizable.Verdict] = field(default_factory=list)  # one per register
    skipped: str = ""  # fault kinds this machine cannot make, and why

    def table(self) -> str:
        rows: dict[str, dict] = defaultdict(lambda: {"rounds": 0, "ok": 0, "failed": 0,
                                                      "unrecovered": 0, "found": defaultdict(int)})
        for r in self.rounds:
            row = rows[r.fault.kind]
            row["rounds"] += 1
            row["ok"] += r.ok
            row["failed"] += r.failed
            row["unrecovered"] += 0 if r.recovered else 1
            for a in r.anomalies:
                row["found"][a.kind] += 1
        head = ["fault", "rounds", "ops ok", "ops failed/unknown", "not recovered",
                "found (within one round)"]
        cells = [head] + [[kind, str(v["rounds"]), str(v["ok"]), str(v["failed"]),
                           str(v["unrecovered"]),
                           ", ".join(f"{n} {k}" for k, n in sorted(v["found"].items()))
                           or "nothing"] for kind, v in sorted(rows.items())]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                         for row in cells)


def attribute(anomaly: Anomaly, rounds: list[Round]) -> list[Round]:
    """The rounds (from the fault's start to the mesh's recovery) whose time overlaps the
    anomaly's window (for a lost write: from when it was known present to the end of the
    first read that missed it)."""
    lo, hi = anomaly.window
    return [r for r in rounds if r.start <= hi and lo <= r.end]


def register_anomalies(verdicts: list[linearizable.Verdict]) -> list[Anomaly]:
    return [Anomaly("nonlinearizable", v.key, list(v.ops), v.detail, v.window)
            for v in verdicts if v.violation]


def run(cfg: Config) -> Result:
    say = print if cfg.log else (lambda *a, **k: None)
    netns.check_available(nft=any(f in PARTITIONS for f in cfg.faults))
    skipped = ""
    if "latency" in cfg.faults:
        skipped = netns.netem_available()
        if skipped:
            say(f"chaos: skipping the latency fault: {skipped}", flush=True)
            faults = tuple(f for f in cfg.faults if f != "latency")
            if not faults:
                raise netns.NetnsUnavailable(f"no fault left to run: {skipped}")
            cfg = dataclasses.replace(cfg, faults=faults)
            skipped = f"latency ({skipped})"
    run_id = uuid.uuid4().hex[:6]
    workdir = cfg.workdir or Path(f"/tmp/moonmesh-chaos-{run_id}")
    rng = random.Random(cfg.seed)
    say(f"chaos: seed {cfg.seed}, run {run_id}, directory {workdir}", flush=True)
    t0 = time.monotonic()
    nodes = cfg.shards * (1 + cfg.replicas) + cfg.spare
    history = History()
    rounds: list[Round] = []
    unread: list[str] = []
    dead: list[str] = []
    dep = Deployment(run_id, nodes, workdir=workdir,
                     proxy_args=("--migration-rate", str(MIGRATION_RATE)))
    workload: Workload | None = None
    nemesis = Nemesis(dep, CLUSTER, rng)
    try:
        dep.start()
        dep.wait("the pool", lambda: sum(1 for n in dep.pool() if n["alive"]) >= nodes, 30)
        create = ["--json", "cluster", "create", CLUSTER, "--shards", str(cfg.shards),
                  "--replicas", str(cfg.replicas)]
        if cfg.min_replicas_ack:
            create += ["--min-replicas-ack", str(cfg.min_replicas_ack)]
        dep.umctl(*create)
        seeds = [f"{n.host.ip}:{PROXY_PORT}" for n in dep.nodes.values()]
        say(f"chaos: {nodes} nodes, {cfg.shards} shards x {cfg.replicas} replicas, 3 etcd "
            f"members, up in {time.monotonic() - t0:.1f}s", flush=True)
        workload = Workload(history, dep.client.ns, seeds, f"c{run_id}", rng.randrange(1 << 30),
                            threads=cfg.threads, keys=cfg.keys, kind=cfg.workload).start()
        nemesis.keys = workload.in_use
        wait_ops(dep, workload, 0, cfg.warmup + 20, min_ok=50)
        if cfg.wait_sync:
            dep.wait("every replica in sync with its master", lambda: replicas_synced(dep), 60)
        time.sleep(cfg.warmup)
        for i in range(cfg.rounds):
            if time.monotonic() - t0 > cfg.time_limit:
                say(f"chaos: time limit reached after {i} rounds")
                break
            kind = rng.choice(cfg.faults)
            mark = len(history.ops)
            start = time.monotonic()
            shown = dep.show(CLUSTER)
            fault = nemesis.start(kind)
            rnd = Round(i + 1, fault, start, before=layout(shown))
            rounds.append(rnd)
            try:
                time.sleep(fault.hold)  # the fault itself: time passing while it holds
            finally:
                nemesis.heal(fault)
            rnd.healed = time.monotonic()
            try:
                recovered(dep, workload, len(history.ops), cfg.recover_timeout, cfg.wait_sync)
            except TimeoutError as exc:
                rnd.recovered, rnd.note = False, str(exc)
                nemesis.heal_all()
            rnd.end = time.monotonic()
            rnd.ok, rnd.failed = workload.throughput(mark)
            try:
                now = dep.show(CLUSTER)
                rnd.after = layout(now)
                rnd.reported_lost = [x for x in now["lost"] if x not in shown["lost"]]
            except Exception as exc:  # noqa: BLE001 - only for the report
                rnd.after = f"unknown ({exc})"
            say(f"chaos: round {rnd.index:3d} {fault}: {rnd.ok} ok, {rnd.failed} failed or "
                f"unknown, {'recovered' if rnd.recovered else 'NOT RECOVERED'} "
                f"{rnd.end - rnd.healed:.1f}s after healing"
                + (f"; {rnd.before} -> {rnd.after}" if rnd.after != rnd.before else "")
                + "".join(f"; view reports lost: {x}" for x in rnd.reported_lost), flush=True)
        workload.halt()
        nemesis.heal_all()
        unread = workload.final_reads()
        dead = dep.dead()
    finally:
        if workload is not None:
            workload.halt()
        dep.close()
    errors = workload.errors if workload else []
    if errors:
        raise RuntimeError(f"a client thread crashed: {errors[0]!r}") from errors[0]
    report = check(history)
    verdicts = linearizable.check(history.ops)
    report.anomalies.extend(register_anomalies(verdicts))
    for a in report.anomalies:
        blamed = attribute(a, rounds)
        if len(blamed) == 1:  # else it is counted apart, as spanning several rounds
            blamed[0].anomalies.append(a)
    result = Result(cfg, run_id, workdir, rounds, report, unread, dead, time.monotonic() - t0,
                    history, verdicts, skipped)
    history.save(workdir / "history.jsonl")
    with open(workdir / "rounds.jsonl", "w") as f:
        for r in rounds:
            f.write(json.dumps({"round": r.index, "fault": r.fault.kind, "targets": r.fault.targets,
                                "hold": r.fault.hold, "detail": r.fault.detail, "start": r.start,
                                "healed": r.healed, "end": r.end, "recovered": r.recovered,
                                "note": r.note, "ok": r.ok, "failed": r.failed,
                                "before": r.before, "after": r.after,
                                "reported_lost": r.reported_lost,
                                "anomalies": len(r.anomalies)}) + "\n")
    text = summary(result)
    (workdir / "report.txt").write_text(text + "\n" + "\n".join(map(str, report.anomalies)))
    say(text, flush=True)
    if report.valid and all(r.recovered for r in rounds) and not cfg.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return result


def summary(result: Result) -> str:
    r = result.report
    found = "no anomaly" if r.valid else ", ".join(
        f"{n} {k}" for k, n in sorted(r.counts().items()))
    lines = [f"chaos: seed {result.config.seed}, {len(result.rounds)} rounds in "
             f"{result.seconds:.0f}s; " + (r.summary() if r.ops else found)]
    if result.verdicts:
        outcomes = Counter(v.outcome for v in result.verdicts)
        registers = [op for op in result.history.ops if op.f in linearizable.REGISTER_OPS]
        lines.append(f"registers: {len(registers)} operations on {len(result.verdicts)} keys, "
                     + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
    lines.append(result.table())
    errors = Counter(f"{op.status}: {re.sub(r'[0-9.]+:[0-9]+: ', '', op.error)[:70]}"
                     for op in result.history.ops if op.status in ("fail", "unknown"))
    if errors:
        lines.append("what clients were told, most often: " + "; ".join(
            f"{n}x {e}" for e, n in errors.most_common(4)))
    outside = [a for a in r.anomalies if not attribute(a, result.rounds)]
    if outside:
        lines.append(f"found outside every fault's time (warm-up, final reads): "
                     f"{len(outside)}")
    several = [a for a in r.anomalies if len(attribute(a, result.rounds)) > 1]
    if several:
        kinds = Counter(a.kind for a in several)
        lines.append("found with a window spanning several rounds (blamed on none): "
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if result.unread:
        lines.append(f"keys never read at the end: {len(result.unread)}")
    if result.dead:
        lines.append(f"processes found dead at the end: {', '.join(result.dead)}")
    if result.skipped:
        lines.append(f"not run here: {result.skipped}")
    for kind in (*KINDS, *linearizable.KINDS):
        found = r.of(kind)
        if found:
            lines.append(f"{kind}: {len(found)}, e.g. {found[0]}")
    if not r.valid or result.config.keep or not all(x.recovered for x in result.rounds):
        lines.append(f"history, report and logs: {result.workdir}")
    c = result.config
    lines.append(f"replay: python -m chaos.run --seed {c.seed} --rounds {c.rounds} --faults "
                 f"{','.join(c.faults)} --shards {c.shards} --replicas {c.replicas} --spare "
                 f"{c.spare}" + (f" --min-replicas-ack {c.min_replicas_ack}"
                                 if c.min_replicas_ack else "")
                 + ("" if c.wait_sync else " --no-wait-sync")
                 + ("" if c.workload == "append" else f" --workload {c.workload}"))
    return "\n".join(line for line in lines if line)


def wait_ops(dep: Deployment, workload: Workload, since: int, timeout: float,
             min_ok: int) -> None:
    dep.wait(f"{min_ok} acknowledged operations",
             lambda: workload.throughput(since)[0] >= min_ok, timeout, every=0.1)


def recovered(dep: Deployment, workload: Workload, since: int, timeout: float,
              wait_sync: bool = True) -> None:
    """Every node alive in the pool and on the cluster's current view, no migration left,
    and then most operations succeeding again."""
    deadline = time.monotonic() + timeout

    behind: list[str] = []

    def settled() -> bool:
        shown = dep.show(CLUSTER)
        members = [n for s in shown["shards"] for n in s["nodes"]]
        behind[:] = [f"{n['node']} (alive {n['alive']}, epoch {n['applied_epoch']} of "
                     f"{shown['epoch']}, backend ok {n['backend_ok']})" for n in members
                     if not (n["alive"] and n["applied_epoch"] == shown["epoch"]
                             and n["backend_ok"])]
        behind.extend(f"migration {m}" for m in shown["migrations"])
        behind.extend(f"failed {n}" for n in shown["failed"])
        return not behind

    try:
        dep.wait("every node alive and on the current view", settled, timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; not settled: {', '.join(behind)}") from None
    # the next fault starts from full redundancy: a replica whose first sync has not finished
    # (Redis delays a diskless sync 5 s) has nothing to give if it is promoted now
    if wait_sync:
        dep.wait("every replica in sync with its master", lambda: replicas_synced(dep),
                 max(1.0, deadline - time.monotonic()))
    mark = len(workload.history.ops)

    def flowing() -> bool:
        ok, bad = workload.throughput(mark)
        if bad > ok:  # start counting again
            return False
        return ok >= 40

    dep.wait("operations succeeding again", flowing, max(1.0, deadline - time.monotonic()),
             every=0.1)


def layout(shown: dict) -> str:
    """`e3 s1=n1/n3 s2=n2/n4`: the epoch, and each shard's master / replicas."""
    parts = [f"e{shown['epoch']}"]
    for s in shown["shards"]:
        nodes = sorted(s["nodes"], key=lambda n: n["role"] != "master")
        parts.append(f"{s['id']}=" + "/".join(n["node"] for n in nodes))
    return " ".join(parts)


def replicas_synced(dep: Deployment) -> bool:
    """Every replica's Redis has its link to its master up, with the master it should have."""
    shown = dep.show(CLUSTER)
    for shard in shown["shards"]:
        master = next(n for n in shard["nodes"] if n["role"] == "master")
        for n in shard["nodes"]:
            if n["role"] != "replica":
                continue
            info = dep.redis_info(n["node"], "replication")
            if info.get("master_link_status") != "up" or \
                    f"{info.get('master_host')}:{info.get('master_port')}" != master["backend"]:
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--faults", default=",".join(Nemesis.KINDS),
                   help="comma-separated kinds, of: " + ", ".join(Nemesis.KINDS))
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--spare", type=int, default=1, help="free nodes in the pool")
    p.add_argument("--min-replicas-ack", type=int, default=0)
    p.add_argument("--no-wait-sync", dest="wait_sync", action="store_false",
                   help="start faults without waiting for replicas to finish their sync")
    p.add_argument("--workload", choices=WORKLOADS, default="append",
                   help="list-append (default), registers checked for linearizability, or "
                        "both on distinct keys")
    p.add_argument("--time-limit", type=float, default=1800)
    p.add_argument("--keep", action="store_true", help="keep the directory even if all is well")
    p.add_argument("--cleanup", action="store_true",
                   help="only delete namespaces that killed runs left behind")
    args = p.parse_args(argv)
    if args.cleanup:
        print(f"chaos: removed {len(netns.remove_leftovers())} namespaces")
        return 0
    # SIGTERM tears down like Ctrl-C does (namespaces are not removed by the kernel)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    faults = tuple(f for f in args.faults.split(",") if f)
    unknown = [f for f in faults if f not in Nemesis.KINDS]
    if unknown:
        p.error(f"unknown faults: {', '.join(unknown)}")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    cfg = Config(seed=seed, rounds=args.rounds, faults=faults, shards=args.shards,
                 replicas=args.replicas, spare=args.spare, min_replicas_ack=args.min_replicas_ack,
                 time_limit=args.time_limit, keep=args.keep, wait_sync=args.wait_sync,
                 workload=args.workload)
    try:
        result = run(cfg)
    except netns.NetnsUnavailable as exc:
        print(f"chaos: cannot run here: {exc}", file=sys.stderr)
        return 2
    return 0 if result.report.valid else 1


if __name__ == "__main__":
    sys.exit(main())
