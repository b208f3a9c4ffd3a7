"""The one way the benchmark scripts write their Markdown reports (imported by its siblings)."""
from __future__ import annotations

import os


def write_report(path: str, text: str) -> str:
    """Write ``text`` to ``path`` (folders created) through a temporary file and ``os.replace``,
    so an interrupted run never leaves a half-written report; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path
