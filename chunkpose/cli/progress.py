"""Progress on the terminal: a bar over frames or images, and a line naming the engine
stage a registration is in (fed by the engine's stage listener)."""
from __future__ import annotations

import sys


def progress(iterable, total, desc, enabled=True):
    from tqdm.auto import tqdm

    # disable=None turns the bar off when stderr is not a terminal (logs, tests, pipes).
    return tqdm(iterable, total=total, desc=desc, unit="frame", disable=None if enabled else True,
                file=sys.stderr, dynamic_ncols=True)


class StageBar:
    """A second progress line naming the engine stage (and its chunks) a call is in, from
    the engine's listener hook. Only on a terminal, and only with a chunkpose engine."""

    def __init__(self, estimator, desc):
        self.engine = getattr(estimator, "engine", None)
        self.desc = desc
        self.enabled = sys.stderr.isatty() and hasattr(self.engine, "add_listener")
        self._bar = None

    def _on_stage(self, event: str, stage) -> None:
        if event == "start":
            self._bar.set_description_str(f"{self.desc}: {stage.name}")
        elif event == "chunk":
            self._bar.set_postfix_str(f"{sum(stage.chunk_sizes)} items", refresh=False)
            self._bar.update()

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, desc=self.desc, leave=False, file=sys.stderr, unit="chunk")
            self.engine.add_listener(self._on_stage)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self.engine.remove_listener(self._on_stage)
            self._bar.close()
        return False
