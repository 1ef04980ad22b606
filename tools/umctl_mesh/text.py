"""Words for umctl-mesh's messages."""
from __future__ import annotations


def plural(n: int, word: str, words: str = "") -> str:
    """`1 slot`, `2 slots` (`words`: an irregular plural: `plural(n, "proxy", "proxies")`)."""
    return f"{n} {word if n == 1 else words or word + 's'}"
