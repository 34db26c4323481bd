"""What a client may name, made safe: file names kept as text only, paths confined to a
folder, text written to logs and CSV cells that cannot forge lines or formulas."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def display_name(client_name: str | None, *, limit: int = 120) -> str:
    """A client's file name as text to store and show, never as a path: its last component
    only, without control characters, at most ``limit`` characters; ``"upload"`` if nothing
    is left."""
    name = unicodedata.normalize("NFC", client_name or "")
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return "upload"
    return name[:limit]


def confined(root: Path, requested: str) -> Path | None:
    """The real path ``requested`` names (relative to ``root``, or absolute) if, with every
    symbolic link followed, it is ``root`` or lies inside it; None otherwise."""
    try:
        base = root.resolve()
        target = (base / requested).resolve()
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return None
    if target == base or base in target.parents:
        return target
    return None


def one_line(text: str, *, limit: int = 1000) -> str:
    """``text`` fit for one line of a log: line breaks and other control characters shown
    as escapes (so a client cannot forge a line), at most ``limit`` characters."""
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    return shown[:limit]


def csv_cell(value: object) -> object:
    """A value for a CSV cell that a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def open_folder(path: Path) -> int:
    """A descriptor of the folder ``path`` itself, refusing a symbolic link in its place
    (``OSError``), so that work done through it cannot be redirected elsewhere."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags)
