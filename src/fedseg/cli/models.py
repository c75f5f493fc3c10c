"""``fedseg train | predict | evaluate | tables``: private models and their evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from fedseg.cli.console import console, err_console, progress_bar
from fedseg.data.layout import case_id_of
from fedseg.data.preprocess import PrepareConfig
from fedseg.data.volume import load_volume, save_volume
from fedseg.errors import DataError, FedsegError
from fedseg.io import loads_json, write_json

DEFAULT_CACHE = Path.home() / ".cache" / "fedseg"

CACHE_HELP = "Folder for preprocessed copies of the site (never inside the site folder)."
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps (default: the config's, auto)."
GPUS_HELP = "Train on N GPUs of this machine together: one process per GPU, torch DDP over NCCL."
PROCESSES_HELP = "Train in N CPU processes together (DDP over gloo), e.g. on a many-core site machine."


def _threads(threads: int | None) -> None:
    import torch  # imported here so that 'fedseg data ...' starts without torch

    if threads is not None:
        torch.set_num_threads(threads)


def _resolve(site_dir: Path, prepare: PrepareConfig, cache: Path):
    from fedseg.data.layout import discover_site
    from fedseg.training.data import resolve_site

    if not (site_dir / "prepared.json").is_file():
        total = len(discover_site(site_dir, prepare.modality).cases)
        with progress_bar(f"preparing {site_dir.name}", total) as advance:
            return resolve_site(site_dir, prepare, cache, on_case=lambda case_id, _computed: advance(case_id))
    return resolve_site(site_dir, prepare, cache)


def train(
    site_dir: Path = typer.Argument(..., help="Site folder (raw, or prepared by 'fedseg data prepare')."),
    out: Path = typer.Option(..., "--out", help="Model directory to create or resume."),
    fold: int | None = typer.Option(None, help="Train only this fold (default: all folds = the ensemble)."),
    all_folds: bool = typer.Option(False, "--all-folds", help="Train every fold (the default)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs per fold (default from config: 40)."),
    network: str | None = typer.Option(None, help="unet-small (default), unet or ahnet."),
    spacing: float | None = typer.Option(None, help="Isotropic voxel size in mm (default 1.0)."),
    seed: int | None = typer.Option(None, help="Seed of initialisation, crops and augmentation."),
    config: Path | None = typer.Option(None, help="TOML file with [train] and [prepare] tables."),
    cache: Path = typer.Option(DEFAULT_CACHE, help=CACHE_HELP),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch (default: all cores)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log metrics for TensorBoard."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    gpus: int | None = typer.Option(None, min=1, help=GPUS_HELP),
    processes: int | None = typer.Option(None, min=1, help=PROCESSES_HELP),
) -> None:
    """Train a private model on one site: one fold, or the five-fold ensemble (resumes if interrupted)."""
    from fedseg.federation.config import load_study_config
    from fedseg.modeldir import ModelRecord, open_model_dir, record_fold
    from fedseg.training.data import SiteData
    from fedseg.training.distributed import place_training
    from fedseg.training.fit import fold_training_set, train_fold
    from fedseg.training.pretrain import phantom_provenance, starting_weights

    if fold is not None and all_folds:
        raise FedsegError("--fold and --all-folds exclude each other")
    study = load_study_config(config)  # the same TOML as a federated study: [train] and [prepare] apply
    overrides = {"epochs": epochs, "network": network, "seed": seed, "threads": threads}
    train_config = study.train.replace(**{k: v for k, v in overrides.items() if v is not None})
    placement = place_training(train_config, device, gpus, processes)  # a device this machine lacks fails here, first
    train_config = placement.config
    prepare = study.prepare if spacing is None else study.prepare.replace(spacing_mm=spacing)
    site = _resolve(site_dir, prepare, cache)
    splits = site.require_splits()
    folds = [fold] if fold is not None else list(range(len(splits.folds)))
    splits.fold(folds[0])  # clear error for a fold that does not exist
    init = starting_weights(train_config, prepare, cache, say=console.print)
    trained_on = [{"site": site.name, "source": str(site.source)}]
    open_model_dir(out, ModelRecord.new(train_config, prepare, trained_on, phantom_provenance(train_config, prepare, cache)))
    data = SiteData(site, train_config.patch)
    console.print(f"training on {placement.describe()}")
    summary = Table("fold", "best val Dice", "best epoch", "epochs", "minutes", title=f"{site.name} → {out}")
    for k in folds:
        training = fold_training_set(site, data, k)
        with (
            placement.group([str(site.prepared)], k, prepare.to_dict(), str(cache)) as parallel,
            progress_bar(f"fold {k}", train_config.epochs) as advance,
        ):
            outcome = train_fold(
                training,
                out / f"fold{k}",
                train_config,
                fold=k,
                on_epoch=lambda r: advance(_epoch_label(r)),
                tensorboard=tensorboard,
                parallel=parallel,
                init_weights=init,
            )
        if outcome.resumed_from:
            console.print(f"fold {k}: resumed after epoch {outcome.resumed_from}")
        record_fold(out, outcome)
        epochs = f"{outcome.epochs} (plateau)" if outcome.stopped_early else str(outcome.epochs)
        summary.add_row(str(k), f"{outcome.best_val_dice:.3f}", str(outcome.best_epoch), epochs, f"{outcome.seconds / 60:.1f}")
    console.print(summary)


def _epoch_label(result) -> str:
    dice = f"val Dice {result.val_dice:.3f}" if result.validated else "not validated"
    return f"{dice} lr {result.learning_rate:.1e}"


def _inference_hardware(device: str | None):
    """Hardware for predict/evaluate: --device, else auto; AMP on CUDA as in training."""
    from fedseg.training.device import resolve_hardware

    hardware = resolve_hardware(device or "auto", None)
    console.print(f"[dim]computing on {hardware.describe()}[/]")
    return hardware


def _input_images(images: Path) -> list[Path]:
    folder = images / "images" if (images / "images").is_dir() else images
    if not folder.is_dir():
        raise DataError(f"{images}: input folder not found")
    files = sorted(p for p in folder.iterdir() if case_id_of(p) is not None)
    if not files:
        raise DataError(f"{folder}: no .nii or .nii.gz images")
    return files


def predict(
    model_dir: Path = typer.Argument(..., help="Model directory (from 'fedseg train')."),
    images: Path = typer.Argument(..., help="Folder of NIfTI images (or a site folder: its images/)."),
    out_dir: Path = typer.Argument(..., help="Where to write one mask per image."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    overwrite: bool = typer.Option(False, help="Replace existing masks in OUT_DIR."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Segment images: each mask is written on the input's ORIGINAL grid (ensemble mean of the folds)."""
    from fedseg.inference import Ensemble

    _threads(threads)
    ensemble = Ensemble.load(model_dir, hardware=_inference_hardware(device))
    files = _input_images(images)
    failures = []
    with progress_bar("predicting", len(files)) as advance:
        for path in files:
            target = out_dir / f"{case_id_of(path)}.nii.gz"
            try:
                if target.exists() and not overwrite:
                    raise DataError(f"{target}: already exists (use --overwrite)")
                mask = ensemble.predict(load_volume(path))
                save_volume(mask, target, "uint8")
            except DataError as exc:
                failures.append(str(exc))
                err_console.print(f"[red]failed[/] {escape(str(exc))}", highlight=False)
            advance(path.name)
    console.print(f"[green]wrote[/] {len(files) - len(failures)} mask(s) to {out_dir}")
    if failures:
        raise FedsegError(f"{len(failures)} of {len(files)} image(s) could not be predicted (see above)")


def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory."),
    site_dir: Path = typer.Argument(..., help="Site folder with labels."),
    split: str = typer.Option("test", help="'test' (the site's held-out cases) or 'all'."),
    json_out: Path | None = typer.Option(None, "--json", help="Write per-case Dice as JSON."),
    name: str | None = typer.Option(None, help="Model name stored in the JSON (default: the folder name)."),
    cache: Path = typer.Option(DEFAULT_CACHE, help=CACHE_HELP),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
) -> None:
    """Dice per case on the original grid, and mean ± SD."""
    from fedseg.metrics import format_mean_sd, summarize
    from fedseg.evaluation.evaluate import cases_of, evaluate_site
    from fedseg.inference import Ensemble

    if split not in ("test", "all"):
        raise FedsegError(f"--split must be 'test' or 'all', got {split!r}")
    _threads(threads)
    ensemble = Ensemble.load(model_dir, hardware=_inference_hardware(device))
    site = _resolve(site_dir, ensemble.prepare, cache)
    with progress_bar(f"evaluating on {site.name}", len(cases_of(site, split))) as advance:  # type: ignore[arg-type]
        scores = evaluate_site(ensemble, site, split, on_case=lambda c, d: advance(f"{c} {d:.3f}"))  # type: ignore[arg-type]
    summary = summarize(list(scores.values()))
    console.print(f"{model_dir.name} on {site.name} ({split}, n={summary.n}): Dice {format_mean_sd(summary)}")
    if json_out is not None:
        record = {
            "model": name or model_dir.resolve().name,
            "test_set": site.name,
            "split": split,
            "grid": "original",
            "mean": summary.mean,
            "sd": summary.sd,
            "dice": scores,
        }
        write_json(json_out, record)  # strict JSON: a NaN Dice is tagged, never written as NaN
        console.print(f"[green]wrote[/] {json_out}")


def tables(
    results: list[Path] = typer.Argument(..., help="JSON files written by 'fedseg evaluate --json'."),
    reference: str = typer.Option(..., help="Model the others are tested against (e.g. fl)."),
    private: str = typer.Option(..., help="Comma-separated private test sets (the Overall column pools them)."),
    external: str = typer.Option("", help="Comma-separated external test sets."),
    out: Path = typer.Option(Path("crosssite"), help="Folder for crosssite.md/.csv/.json."),
) -> None:
    """The paper's Tables 3 and 4 from per-case Dice: mean ± SD, Overall, paired t-tests."""
    from fedseg.evaluation.crosssite import cross_site_table
    from fedseg.report import crosssite_markdown, write_tables

    dice: dict[str, dict[str, dict[str, float]]] = {}
    for path in results:
        try:
            record = loads_json(path.read_text(encoding="utf-8"))
            dice.setdefault(record["model"], {})[record["test_set"]] = record["dice"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not a 'fedseg evaluate --json' file ({exc})") from exc
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    table = cross_site_table(dice, private_sets=split(private), reference=reference, external_sets=split(external))
    paths = write_tables(table, out)
    console.print(crosssite_markdown(table))
    console.print(f"[green]wrote[/] {', '.join(str(p) for p in paths.values())}")
