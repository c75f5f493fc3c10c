"""``fedseg study``: the paper's whole experiment in one command (see :mod:`fedseg.study.pipeline`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.console import console


def study(
    site_dirs: list[Path] | None = typer.Argument(None, help="Site folders (at least two), e.g. after --sites; none: synthetic institutions.", show_default=False),
    sites: bool = typer.Option(False, "--sites", help="Use the SITE_DIRS given as arguments: fedseg study --sites A B C --external X."),
    out: Path = typer.Option(Path("fedseg-study"), "--out", help="Folder for everything the study writes (a rerun continues it)."),
    profile: str = typer.Option("demo", help="demo (11-13 min on 2 CPU cores) or paper (the paper's protocol, for a GPU)."),
    external: Path | None = typer.Option(None, help="External test set folder (with --sites)."),
    config: Path | None = typer.Option(None, help="study.toml overriding the profile: tables study, federation, train, prepare."),
    steps: str = typer.Option(",".join(("data", "prepare", "train", "federate", "evaluate", "report")), help="Steps to run, in order."),
    device: str | None = typer.Option(None, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps, for every training and evaluation process (default: the profile's, auto)."),
) -> None:
    """Reproduce the paper: private, federated and pooled five-fold ensembles, cross-site tables, a report."""
    from rich.markup import escape

    from fedseg.errors import FedsegError
    from fedseg.study.pipeline import STEPS, StudyRun, StudySources
    from fedseg.study.profiles import load_settings

    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise FedsegError(f"unknown step(s) {unknown}; the steps are {', '.join(STEPS)}")
    if sites and not site_dirs:
        raise FedsegError("--sites needs the site folders after it: fedseg study --sites A B C")
    if external is not None and not site_dirs:
        raise FedsegError("--external goes with --sites (the synthetic study makes its own external set)")
    settings = load_settings(profile, config)
    settings = settings.on_device(device or settings.study.train.device)
    for line in settings.describe(synthetic=not site_dirs):
        console.print(f"[dim]{escape(line)}[/]")
    run = StudyRun(out, settings, StudySources(tuple(site_dirs or ()), external), say=lambda text: console.print(escape(text)))
    run.run(chosen)
