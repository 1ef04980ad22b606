"""Graceful failover: a shard's master hands it to a replica without losing a write.

One implementation for `umctl-mesh failover` and `node drain` (tools/) and for a master's
agent shutting down cleanly (mesh/agent.py):

1. The master's proxy is told `UMCTL HANDOVER` (after proving the mesh secret): it answers
   writes `-TRYAGAIN` from then on, and its Redis runs `FAILOVER TO <replica>`, which pauses
   writes, waits until the replica has every one of them and swaps the roles.
2. The view with the replica as master and the old master as its replica is written by
   compare-and-swap on the view's revision, and only if the shard is still as it was read:
   whoever commits (an operator, a node that is no leader) can only make this one swap, never
   overwrite a change made meanwhile. The old master's proxy takes writes again only as a
   replica (it redirects them) once it applied that view.
"""
from __future__ import annotations

import anyio

from core import secret
from core.address import Address
from core.view import ClusterView, ViewError

from .model.changes import ChangeError, handed_over, handover_target
from .redisctl import RedisCtl, RedisCtlError
from .store.repo import MeshRepo, StoredView

HANDOVER_TIMEOUT_MS = 5000  # per FAILOVER try: how long the replica has to catch up
HANDOVER_DEADLINE = 60.0  # the proxy retries FAILOVER for up to 6 x (5 + 2) s
COMMIT_RETRIES = 5  # lost view races before giving up


class HandoverError(Exception):
    """The graceful failover did not happen (or its view was not written): one line."""


async def graceful_failover(repo: MeshRepo, cluster: str, shard_id: str, to: str | None,
                            mesh_secret: bytes | None, *,
                            master: str | None = None) -> ClusterView:
    """Hand shard `shard_id` of `cluster` to `to` (default: the live replica with the highest
    replication offset) and return the view that records it. `master`: proceed only while
    this node is the shard's master (a node handing over its own shard)."""
    view = (await _stored(repo, cluster, f"unknown cluster '{cluster}'")).view
    shard = next((s for s in view.shards if s.id == shard_id), None)
    if shard is not None and master is not None and shard.master != master:
        raise HandoverError(f"{master} is not the master of {shard_id} (it is {shard.master})")
    registered = await repo.nodes()
    offsets = {nid: s.repl_offset for nid, s in (await repo.statuses()).items()}
    try:
        target = handover_target(view, shard_id, registered, offsets, to)
    except ChangeError as exc:
        raise HandoverError(str(exc)) from None
    old = next(s for s in view.shards if s.id == shard_id).master
    need_secret(mesh_secret)
    try:
        await hand_over(view.address_of(old).proxy, view.address_of(target).backend,
                        mesh_secret)
    except HandoverError as exc:
        raise HandoverError(f"the handover from {old} to {target} failed: {exc}") from None
    return await commit_handover(repo, cluster, shard_id, old, target)


async def hand_over(proxy: str, replica_backend: str, mesh_secret: bytes | None) -> None:
    """Step 1: through the master's proxy, swap its Redis with the replica's (Redis FAILOVER,
    which loses no write). Returns once the master's Redis is a replica."""
    mesh_secret = need_secret(mesh_secret)
    backend = Address.parse(replica_backend)
    ctl = RedisCtl(proxy)
    try:
        with anyio.fail_after(HANDOVER_DEADLINE):
            nonce = await ctl.call("UMCTL", "CHALLENGE")
            if not isinstance(nonce, bytes):
                raise HandoverError(f"unexpected UMCTL CHALLENGE reply {nonce!r}")
            await ctl.call("UMCTL", "PROVE", secret.proof(mesh_secret, nonce))
            await ctl.call("UMCTL", "HANDOVER", backend.host, backend.port, HANDOVER_TIMEOUT_MS)
    except (RedisCtlError, TimeoutError, OSError) as exc:
        raise HandoverError(str(exc) or type(exc).__name__) from None
    finally:
        await ctl.aclose()


def need_secret(mesh_secret: bytes | None) -> bytes:
    if mesh_secret is None:
        raise HandoverError(f"a graceful failover needs the mesh secret (${secret.SECRET_ENV} "
                            "or --mesh-secret-file), the one the nodes were started with")
    return mesh_secret


async def commit_handover(repo: MeshRepo, cluster: str, shard_id: str, master: str,
                          target: str) -> ClusterView:
    """Step 2: write the view with `target` as the master of `shard_id`, by compare-and-swap,
    re-read and re-checked after a lost race."""
    for _ in range(COMMIT_RETRIES):
        stored = await _stored(repo, cluster,
                               f"cluster '{cluster}' was deleted during the handover")
        try:
            new = handed_over(stored.view, shard_id, master, target)
        except (ChangeError, ViewError) as exc:
            raise HandoverError(f"the handover of {shard_id} to {target} was not recorded: "
                                f"{exc}") from None
        if new is None:
            return stored.view
        if await repo.commit_view(cluster, stored.revision, new):
            return new
    raise HandoverError(f"cluster '{cluster}' kept changing; the handover of {shard_id} to "
                        f"{target} was not recorded")


async def _stored(repo: MeshRepo, cluster: str, missing: str) -> StoredView:
    """The cluster's view as stored; HandoverError (`missing` if there is none)."""
    try:
        stored = await repo.view(cluster)
    except ViewError as exc:
        raise HandoverError(f"the view of '{cluster}' in etcd is invalid: {exc}") from None
    if stored is None:
        raise HandoverError(missing)
    return stored
