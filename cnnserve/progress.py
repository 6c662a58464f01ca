"""The training progress display: one per epoch, on stderr.

On a terminal each epoch has a tqdm bar that ends with the epoch's loss and accuracies. When
stderr is not a terminal (a log file, a pipe, CI) there is no bar, and so no carriage-return
debris: one plain line per epoch once it ends, unless the caller prints its own epoch line.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["EpochProgress"]


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


class EpochProgress:
    """The display of one epoch.

    Parameters
    ----------
    epoch : int
        The epoch, counted from 1.
    num_epochs : int
        The run's epochs in all.
    iterations : int
        The epoch's iterations.
    enabled : bool
        Show anything at all.
    plain_line : bool
        Without a terminal, print one line when the epoch ends (False when the caller prints
        its own epoch line).
    stream : file, optional
        Where to show it (default ``sys.stderr``).
    """

    def __init__(
        self,
        epoch: int,
        num_epochs: int,
        iterations: int,
        *,
        enabled: bool,
        plain_line: bool,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.label = f"epoch {epoch}/{num_epochs}"
        self.enabled = enabled
        self.plain_line = plain_line
        self.bar = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(
                total=iterations,
                desc=self.label,
                unit="it",
                file=self.stream,
                leave=True,
                dynamic_ncols=True,
            )

    def update(self, loss: float, **postfix: str) -> None:
        """One iteration done with this loss."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", **postfix, refresh=False)
            self.bar.update(1)

    def finish(self, seconds: float, **results: str) -> None:
        """The epoch ended: its results (name to formatted value) on the bar, or one line."""
        if self.bar is not None:
            self.bar.set_postfix(**results)
        elif self.enabled and self.plain_line:
            shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in results.items())
            print(f"{self.label}: {shown} ({seconds:.1f} s)", file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar, if any."""
        if self.bar is not None:
            self.bar.close()
