"""The admin secret: the mesh's shared secret (or a standalone proxy's admin password), proven
by HMAC challenge-response so it never crosses the wire. Pure."""
from __future__ import annotations

import hashlib
import hmac
import os

SECRET_ENV = "MOONMESH_SECRET"
NONCE_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES).hex().encode()


def proof(secret: bytes, nonce: bytes) -> bytes:
    """What a holder of `secret` answers to the challenge `nonce` (hex)."""
    return hmac.new(secret, b"moonmesh-admin:" + nonce, hashlib.sha256).hexdigest().encode()


def proves(secret: bytes, nonce: bytes, answer: bytes) -> bool:
    return hmac.compare_digest(proof(secret, nonce), answer)


def load(path: str | None) -> bytes | None:
    """The secret from a file (its first line), else from $MOONMESH_SECRET, else None."""
    if path:
        with open(path, "rb") as f:
            secret = f.readline().strip()
        if not secret:
            raise ValueError(f"{path} holds no secret")
        return secret
    value = os.environ.get(SECRET_ENV, "").strip()
    return value.encode() if value else None
