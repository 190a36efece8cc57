"""The rich console every lmscan output goes through: wrapped on a terminal, whole lines elsewhere.

Rich falls back to 80 columns when it cannot ask a terminal for a width, so a report
piped to a file or a CI log had its model path, finding details and notices broken
over lines (and table cells cut). Off a terminal nothing is wrapped: a line is as long
as it needs to be. An explicit width or ``COLUMNS`` still wins.
"""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions

# Wide enough that no line of a report reaches it; tables are sized to their content, so
# nothing is padded out to this width.
UNWRAPPED_WIDTH = 100_000


class OutputConsole(Console):
    """A rich Console that wraps at the terminal's width on a terminal and nowhere else."""

    def __init__(self, *args, width: int | None = None, **kwargs):
        super().__init__(*args, width=width, **kwargs)
        self._width_given = width is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width_given or self.is_terminal or "COLUMNS" in os.environ:
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)
