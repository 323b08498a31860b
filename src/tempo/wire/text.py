"""Strings that come from a peer, made safe to print: a worker picks its name and its failure messages."""

from __future__ import annotations

MAX_PEER_TEXT = 200


def printable(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """`text` with every non-printable character (terminal escapes, newlines, NUL) shown as its escape code and
    cut to `limit` characters: a peer's string reaches our logs and terminal, never its control sequences."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return shown if len(shown) <= limit else shown[:limit] + "…"
