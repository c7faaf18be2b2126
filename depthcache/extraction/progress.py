"""A progress bar for long extractions: tokens/s, MB/s written and ETA on a terminal, silent elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    """tqdm bar over tokens with the writer's throughput as a postfix; disabled off a terminal or in CI."""

    def __init__(self, total: int, done: int, bytes_written: Callable[[], int], enabled: bool | None = None) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not show,
                        desc="extract", dynamic_ncols=True)
        self.bytes_written, self.started = bytes_written, time.perf_counter()

    def update(self, tokens: int) -> None:
        """Advance by ``tokens`` and refresh the write rate."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.bytes_written() / seconds / 2**20:.0f} MB/s written", refresh=False)
        self.bar.update(tokens)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()
