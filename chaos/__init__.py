"""Chaos testing: nodes as hosts in Linux network namespaces, a nemesis that partitions,
pauses, kills and restarts them, a client that records every operation, and a history checker.

- `chaos/history.py`: the operation history and its list-append checker (pure, no I/O).
- `chaos/linearizable.py`: the register linearizability checker (pure, no I/O).
- `chaos/netns.py`: namespaces on one bridge, partitions with nft inside them.
- `chaos/hosts.py`: etcd members and mesh nodes as processes inside those namespaces.
- `chaos/workload.py`: the list-append and register clients that record the history.
- `chaos/nemesis.py`: the faults (partitions, pauses, kills, migrations struck mid-way, a
  stalled Redis, packet loss and latency), each bounded in time, and their healing.
- `chaos/run.py`: rounds of faults under load, the check and the summary (`make chaos`).
"""
