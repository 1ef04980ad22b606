"""`HOST:PORT` addresses, IPv6 in brackets (`[::1]:7000`), parsed and printed in one place."""
from __future__ import annotations

from dataclasses import dataclass


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # without brackets
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise AddressError(f"an IPv6 address needs brackets: '[{host}]:{port}', got '{text}'")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AddressError(f"expected HOST:PORT, got '{text}'")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
