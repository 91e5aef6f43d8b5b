"""A progress bar on stderr for the long offline runs (replay, backtest), drawn by tqdm when
stderr is a terminal and silent otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`update(done)` takes the count done so far (not an increment)."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr) -> None:
        self.enabled = stream.isatty()
        self._bar = tqdm(total=max(total, 1), desc=label, file=stream, disable=not self.enabled, dynamic_ncols=True,
                         mininterval=0.2)

    def update(self, done: int) -> None:
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()
