"""``fedseg study``: the paper's whole experiment in one command (see :mod:`fedseg.study.pipeline`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli.console import console


def study(
    site_dirs: list[Path] | None = typer.Argument(None, help="Site folders (at least two), e.g. after --sites; none: synthetic institutions.", show_default=False),
    sites: bool = typer.Option(False, "--sites", help="Use the SITE_DIRS given as arguments: fedseg study --sites A B C --external X."),
    out: Path = typer.Option(Path("fedseg-study"), "--out", help="Folder for everything the study writes (a rerun continues it)."),
    profile: str = typer.Option("demo", help="demo (synthetic sites, about 8 min on 2 CPU cores), small-sites (--sites of a few cases each: starts from weights learnt on fedseg's phantom) or paper (the paper's protocol, for a GPU)."),
    external: Path | None = typer.Option(None, help="External test set folder (with --sites)."),
    config: Path | None = typer.Option(None, help="study.toml overriding the profile: tables study, federation, train, prepare."),
    steps: str = typer.Option(",".join(("data", "prepare", "train", "federate", "evaluate", "report")), help="Steps to run, in order."),
    device: str | None = typer.Option(None, help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps, for every training and evaluation process (default: the profile's, auto)."),
    seeds: str | None = typer.Option(None, help="Run the whole study once per seed, e.g. 0,1,2 (in OUT/seed-N), and report in how many seeds each comparison held (OUT/robustness.md)."),
) -> None:
    """Reproduce the paper: private, federated and pooled five-fold ensembles, cross-site tables, a report."""
    from rich.markup import escape

    from fedseg.errors import FedsegError
    from fedseg.study.pipeline import STEPS, StudyRun, StudySources
    from fedseg.study.profiles import load_settings
    from fedseg.study.seeds import parse_seeds, seed_folder

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
    if seeds is not None:
        settings = settings.with_seeds(parse_seeds(seeds))
    for line in settings.describe(synthetic=not site_dirs):
        console.print(f"[dim]{escape(line)}[/]")
    sources = StudySources(tuple(site_dirs or ()), external)
    say = lambda text: console.print(escape(text))  # noqa: E731
    each_seed = settings.plan.seeds
    if not each_seed:
        StudyRun(out, settings, sources, say=say).run(chosen)
        return
    for seed in each_seed:
        console.print(f"[bold]seed {seed}[/] ({len(each_seed)} seeds) -> {seed_folder(out, seed)}")
        StudyRun(seed_folder(out, seed), settings.for_seed(seed), sources, say=say).run(chosen)
    if "report" in chosen:
        _robustness(out, each_seed)


def _robustness(out: Path, seeds: tuple[int, ...] | list[int]) -> None:
    from rich.markup import escape

    from fedseg.errors import FedsegError
    from fedseg.io import read_json
    from fedseg.study.seeds import seed_folder, write_robustness

    results = {}
    for seed in seeds:
        path = seed_folder(out, seed) / "results.json"
        if not path.is_file():
            raise FedsegError(f"{path} is missing: seed {seed}'s study has not run its evaluate step")
        results[seed] = read_json(path)  # strict JSON: a NaN is tagged, and read back as one
    path, record = write_robustness(out, results)
    console.print(f"[bold]The finding across {len(seeds)} seeds[/] ({path}):")
    for claim, held in record["held"].items():
        style = "green" if held == len(seeds) else "yellow"
        console.print(f"  [{style}]{escape(claim)}: held in {held} of {len(seeds)}[/]")
