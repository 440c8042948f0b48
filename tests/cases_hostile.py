"""Hostile inputs shared by the tests of what cnnops must never trust: a pickle that runs code when
loaded, and class names that carry terminal markup and escape sequences."""

from __future__ import annotations

from pathlib import Path

# rich markup that would hide a hyperlink or crash a table, and an OSC sequence that retitles a terminal
EVIL_NAMES = ["[link=https://evil.example]a[/link]", "\x1b]0;pwned\x07b", "[/]"]


class Payload:
    """A pickle that runs code when loaded: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))
