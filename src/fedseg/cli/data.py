"""``fedseg data ...``: check, import, prepare, split and synthesise site data."""

from __future__ import annotations

import statistics
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from fedseg.cli.console import console, err_console, progress_bar
from fedseg.data.check import CheckReport, check_site
from fedseg.data.layout import discover_site
from fedseg.data.preprocess import PrepareConfig, prepare_site
from fedseg.data.splits import SPLITS_FILE, ensure_splits, small_site_warning
from fedseg.data.synth import DEFAULT_EXTERNAL
from fedseg.data.synth import DEFAULT_SITES as SYNTH_SITES
from fedseg.errors import DataError

app = typer.Typer(help="Check, import, prepare, split and synthesise a site's data.", no_args_is_help=True)

DEFAULT_SITES = ",".join(SYNTH_SITES)


def _range(values: list[float], fmt: str = "{:.3g}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def _print_summary(report: CheckReport) -> None:
    cases = report.cases
    table = Table(title=f"{report.layout.root} ({report.layout.kind} layout)", show_header=False)
    table.add_row("valid cases", f"{len(cases)} of {len(report.layout.cases)}")
    if cases:
        for axis, name in enumerate(("x", "y", "z")):
            table.add_row(f"spacing {name} (mm)", _range([c.spacing[axis] for c in cases]))
        table.add_row("shape", f"{min(c.shape for c in cases)} … {max(c.shape for c in cases)}")
        volumes = [c.gland_ml for c in cases]
        table.add_row("gland volume (mL)", f"{_range(volumes, '{:.1f}')} (median {statistics.median(volumes):.1f})")
    console.print(table)


@app.command("check")
def check(
    site: Path = typer.Argument(..., help="Site folder (images/ + labels/, or a Decathlon dataset.json)."),
    modality: str = typer.Option("T2", help="Channel name to use in 4-D Decathlon images."),
) -> None:
    """Validate a site folder: readable files, matching grids, allowed labels, non-empty masks.

    Exits 1 and names every bad file with its reason; files are never modified.
    """
    total = len(discover_site(site, modality).cases)
    with progress_bar("checking", total) as advance:
        report = check_site(site, modality, on_case=advance)
    _print_summary(report)
    if report.problems:
        for problem in report.problems:
            err_console.print(f"[red]bad file[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise DataError(f"{site}: {len(report.problems)} problem(s) found")
    if not report.ok:
        raise DataError(f"{site}: no valid cases")
    console.print(f"[green]ok[/] {site}: {len(report.cases)} cases")
    warning = small_site_warning(site.name, len(report.cases))
    if warning:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


@app.command("import-dicom")
def import_dicom(
    src: Path = typer.Argument(..., help="Folder holding one DICOM T2 series."),
    out: Path = typer.Argument(..., help="Output NIfTI file (.nii.gz)."),
    series: str | None = typer.Option(None, help="SeriesInstanceUID, when the folder holds several series."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Convert one DICOM series to NIfTI with its true (also oblique) geometry."""
    from fedseg.data.dicom import import_dicom_series

    volume = import_dicom_series(src, out, series_uid=series, overwrite=overwrite)
    spacing = "x".join(f"{s:.3g}" for s in volume.spacing)
    console.print(f"[green]wrote[/] {out}: {volume.shape} voxels of {spacing} mm")


@app.command("prepare")
def prepare(
    src: Path = typer.Argument(..., help="Site folder to preprocess (read only)."),
    dst: Path = typer.Argument(..., help="Output folder for the prepared cases (new or previously prepared)."),
    spacing: float = typer.Option(1.0, help="Isotropic voxel size in mm (the paper: 1)."),
    order: int = typer.Option(1, help="Image interpolation: 1 linear, 3 cubic. Labels use nearest."),
    modality: str = typer.Option("T2", help="Channel name to use in 4-D Decathlon images."),
    seed: int = typer.Option(0, help="Seed of the split made when SRC has no splits.json."),
) -> None:
    """Reorient, resample to isotropic voxels and z-score every case (cached per case and config)."""
    config = PrepareConfig(spacing_mm=spacing, image_order=order, modality=modality)
    total = len(discover_site(src, modality).cases)
    computed = 0
    with progress_bar("preparing", total) as advance:

        def on_case(case_id: str, was_computed: bool) -> None:
            nonlocal computed
            computed += was_computed
            advance(case_id)

        prepare_site(src, dst, config, on_case=on_case, split_seed=seed)
    console.print(f"[green]prepared[/] {dst}: {computed} computed, {total - computed} reused from cache")
    if not (dst / SPLITS_FILE).exists():
        console.print(f"[yellow]note:[/] {total} case(s) are too few to split; {dst} can serve as an external test set")


@app.command("split")
def split(
    site: Path = typer.Argument(..., help="Site folder."),
    seed: int = typer.Option(0, help="Seed of the shuffle."),
    test_fraction: float = typer.Option(0.2, help="Fraction of cases held out for testing."),
    folds: int = typer.Option(5, help="Cross-validation folds over the training cases."),
    out: Path | None = typer.Option(None, help=f"Where to write the split (default: SITE/{SPLITS_FILE})."),
) -> None:
    """Make (or show the existing) train/test split and cross-validation folds of a site."""
    layout = discover_site(site)
    path = out or site / SPLITS_FILE
    splits, created = ensure_splits(path, [c.case_id for c in layout.cases], seed, test_fraction, folds)
    verb = "wrote" if created else "reusing existing"
    console.print(f"[green]{verb}[/] {path}: {len(splits.train)} train, {len(splits.test)} test, {len(splits.folds)} folds")
    if splits.note:
        console.print(f"[yellow]note:[/] {splits.note}")


@app.command("synth")
def synth(
    out: Path = typer.Argument(..., help="Folder to write one site folder per institution into."),
    sites: str = typer.Option(DEFAULT_SITES, help="Comma-separated site profiles."),
    external: str = typer.Option(DEFAULT_EXTERNAL, help="External test set profile, or 'none'."),
    cases: int = typer.Option(100, min=1, help="Cases per site."),
    external_cases: int | None = typer.Option(None, min=1, help="Cases in the external set (default: --cases)."),
    seed: int = typer.Option(0, help="Root seed; the same seed gives identical files."),
    fov: float | None = typer.Option(None, help="In-plane field of view in mm (default: each profile's)."),
    resolution_scale: float = typer.Option(1.0, min=1.0, help="Coarsen every site's voxels by this factor (quick runs)."),
    preview: bool = typer.Option(False, "--preview", help="Also save OUT/preview.png: one slice per site with the mask contour."),
) -> None:
    """Synthesise T2-weighted pelvis phantoms for several institutions (and an external set)."""
    from fedseg.data.preview import save_site_preview
    from fedseg.data.synth import synthesize_study

    site_names = [s.strip() for s in sites.split(",") if s.strip()]
    ext = None if external.lower() == "none" else external
    total = cases * len(site_names) + (0 if ext is None else external_cases or cases)
    with progress_bar("synthesising", total) as advance:
        site_dirs = synthesize_study(
            out,
            site_names,
            ext,
            cases,
            seed,
            external_cases=external_cases,
            fov_mm=fov,
            resolution_scale=resolution_scale,
            on_case=lambda site, case_id: advance(f"{site}/{case_id}"),
        )
    for site_dir in site_dirs:
        console.print(f"[green]wrote[/] {site_dir}")
    if preview:
        png = save_site_preview(site_dirs, out / "preview.png")
        console.print(f"[green]preview[/] {png}")


@app.command("preview")
def preview(
    sites: list[Path] = typer.Argument(..., help="Site folders to show."),
    out: Path = typer.Option(Path("preview.png"), help="PNG to write."),
) -> None:
    """Save one axial slice per site with the mask contour, to eyeball the data."""
    from fedseg.data.preview import save_site_preview

    png = save_site_preview(list(sites), out)
    console.print(f"[green]preview[/] {png}")
