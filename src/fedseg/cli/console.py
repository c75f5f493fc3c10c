"""Terminal output shared by the commands: one console pair and progress bars."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with control characters written as ``\\xNN`` / ``\\uNNNN``: a peer's reason cannot forge log lines or colour codes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


class SafeFormatter(logging.Formatter):
    """A log formatter whose messages keep one line each: newlines and control characters inside them are escaped.

    Reasons logged by the server and clients come from the network (a site's
    ERROR reason, a certificate's name); escaping them here covers every log line.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatMessage(record)).replace("\n", "\\n")


def configure_logging(level: int = logging.INFO) -> None:
    """INFO logs to stderr through :class:`SafeFormatter` (a no-op when logging is already configured)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


console = Console(soft_wrap=True)  # paths stay on one line, whatever the terminal width
err_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(label)``: call it once per finished item."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[item]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(description, total=total, item="")

        def advance(label: str = "") -> None:
            progress.update(task, advance=1, item=label)

        yield advance
