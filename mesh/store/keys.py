"""The etcd key layout. The only module that knows it (DESIGN.md section 3). Pure."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROOT = "/moonmesh"


@dataclass(frozen=True, slots=True)
class Keys:
    root: str = DEFAULT_ROOT

    def _k(self, *parts: str) -> bytes:
        return "/".join((self.root.rstrip("/"), *parts)).encode()

    # node records, attached to each node's lease
    @property
    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def node(self, node_id: str) -> bytes:
        return self._k("nodes", node_id)

    # one view per cluster, written only by compare-and-swap
    @property
    def clusters(self) -> bytes:
        return self._k("clusters", "")

    def view(self, cluster: str) -> bytes:
        return self._k("clusters", cluster, "view")

    def cluster_of_view_key(self, key: bytes) -> str | None:
        prefix = self.clusters
        if key.startswith(prefix) and key.endswith(b"/view"):
            return key[len(prefix) : -len(b"/view")].decode()
        return None

    # what each node has applied and observed, leased
    @property
    def statuses(self) -> bytes:
        return self._k("status", "")

    def status(self, node_id: str) -> bytes:
        return self._k("status", node_id)

    # which cluster a node belongs to (not leased; written with the view that uses the node)
    @property
    def assignments(self) -> bytes:
        return self._k("assign", "")

    def assignment(self, node_id: str) -> bytes:
        return self._k("assign", node_id)

    # whose data a node's Redis holds (not leased: it outlives the process)
    @property
    def data_owners(self) -> bytes:
        return self._k("data", "")

    def data_owner(self, node_id: str) -> bytes:
        return self._k("data", node_id)

    # leader election: one leased key per candidate, lowest create_revision leads
    @property
    def election(self) -> bytes:
        return self._k("election", "")

    def candidate(self, lease_id: int) -> bytes:
        return self._k("election", f"{lease_id:016x}")

    @staticmethod
    def last_part(key: bytes) -> str:
        return key.rsplit(b"/", 1)[-1].decode()
