"""The ``fedseg`` command. Thin: parse arguments, call the library, print."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from fedseg import __version__
from fedseg.cli import data as data_commands
from fedseg.cli import federation as federation_commands
from fedseg.cli import models as model_commands
from fedseg.cli import study as study_commands
from fedseg.cli.console import err_console
from fedseg.errors import FedsegError
from fedseg.processes import Terminated, terminate_like_interrupt

app = typer.Typer(
    name="fedseg",
    help="Federated 3-D segmentation of prostate MRI across hospitals, without images leaving any site.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_commands.app, name="data")
app.add_typer(federation_commands.provision_app, name="provision")
for command in (
    study_commands.study,
    model_commands.train,
    model_commands.predict,
    model_commands.evaluate,
    model_commands.tables,
    federation_commands.server,
    federation_commands.client,
    federation_commands.federate,
):
    app.command()(command)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fedseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Federated 3-D segmentation of prostate MRI across hospitals."""


def main() -> None:
    """Console entry point: user errors and OS errors become one red line and exit code 1.

    SIGTERM unwinds like Ctrl-C (child processes stopped, files closed, a run
    resumable from its last committed round) and exits with 143.
    """
    try:
        with terminate_like_interrupt():
            app()
    except FedsegError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # permissions, full disk, read-only media: the message names the path
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Terminated:
        err_console.print("[yellow]terminated[/]")
        sys.exit(143)


if __name__ == "__main__":
    main()
