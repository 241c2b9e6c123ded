"""Folders that are either complete or absent: write into a hidden sibling, then move it.

Every writer of a folder (a run's outputs, a synthetic scene, a BOP dataset) goes through
``staged_folder``: the work happens in a temporary folder next to the destination, and only a
block that finishes without an exception moves it into place (replacing what was there,
when the caller's policy allows it). A failed or interrupted write leaves nothing behind,
and a reader never sees half a folder.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(final):
    """Yield a temporary folder that replaces ``final`` when the block succeeds.

    Args:
        final: the destination folder; its parent is created. Whether an existing one may
            be replaced is the caller's decision, taken before entering.

    Yields:
        The temporary folder (a sibling of ``final``, removed when the block fails).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def replace_folder(source: Path, final: Path) -> None:
    """Move ``source`` to ``final``; an existing ``final`` is moved aside first and deleted
    after, so ``final`` is never half there."""
    old = None
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
    os.replace(source, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
