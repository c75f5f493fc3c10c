"""``fedseg provision``: certificates and start-up kits for a federated study."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.console import console


def provision(
    server_name: str = typer.Option(..., help="Host name (or IP) the sites will connect to."),
    sites: str = typer.Option(..., help="Comma-separated site names, e.g. nci,suny,ucla (each becomes a certificate identity)."),
    out: Path = typer.Option(..., help="New folder for the kits (must not exist or be empty)."),
    port: int = typer.Option(8443, help="Server port."),
    days: int = typer.Option(825, help="Certificate validity in days."),
    study: str = typer.Option("fedseg-study", help="Study name written into every kit."),
) -> None:
    """Create a study CA, a server certificate and one client certificate per site, as start-up kits."""
    from fedseg.federation.provision import provision_study

    kits = provision_study(server_name, [s.strip() for s in sites.split(",") if s.strip()], out, days=days, study=study, port=port)
    for name, folder in kits.items():
        what = "keep OFFLINE: the CA key, needed only to add sites" if name == "ca" else f"give to {name} (see {folder}/README.txt)"
        console.print(f"[green]kit[/] {folder}: {what}")
