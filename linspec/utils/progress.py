"""The progress bar of every long linspec command: tqdm on stderr, the same bar training and evaluation draw.

A benchmark or an evaluation can run for minutes; a bar that counts its units (measurements, prompts, steps) says
it is alive and how far it is. Written to stderr so stdout keeps only results; tqdm redraws in place on a
terminal and prints a line per update in a log, throttled to ``LOG_INTERVAL`` seconds there.
"""

from __future__ import annotations

import sys

LOG_INTERVAL = 10.0  # seconds between lines when stderr is not a terminal


def progress_bar(total: int, description: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar over ``total`` units: ``bar.update()`` per unit done, ``show_item(bar, text)`` for the current one."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total, desc=description, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
        mininterval=0.1 if interactive else LOG_INTERVAL,
    )  # fmt: skip


def show_item(bar, text: str) -> None:
    """Name the unit under way beside the bar: redrawn at once on a terminal, in the next line of a log."""
    bar.set_postfix_str(text, refresh=sys.stderr.isatty())
