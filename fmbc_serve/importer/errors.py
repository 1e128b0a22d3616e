"""The importer's one error, and how its messages list ids."""

from __future__ import annotations


class ImportRefused(ValueError):
    """The source cannot be imported exactly; the message says why (shown as a CLI error, exit status 2)."""


def format_ids(ids: list[int]) -> str:
    """The first ids of a list, for a message."""
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
