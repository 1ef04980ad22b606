"""The data path: RESP, routing, sessions, backends; it does not know etcd exists."""
