"""The client package's public names are exactly the ones the README documents, and each imports."""

from __future__ import annotations

import re
from pathlib import Path

import client

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_names() -> list[str]:
    text = README.read_text()
    start = text.index("Public names (`client.__all__`")
    paragraph = text[start : text.index("\n\n", start)]
    listed = paragraph[paragraph.index("may change):") : paragraph.index(". Every error")]
    return re.findall(r"`([A-Za-z_]+)`", listed)


def test_public_names_are_exactly_the_documented_ones():
    assert documented_names() == list(client.__all__)
    for name in client.__all__:
        assert getattr(client, name).__name__ == name


def test_every_public_error_is_a_swarm_error():
    errors = [getattr(client, name) for name in client.__all__ if name.endswith("Error") or name == "ServerFailure"]
    assert len(errors) == 9
    assert all(issubclass(error, client.SwarmError) for error in errors)
