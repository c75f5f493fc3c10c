"""``fedseg provision | server | client | federate``: a federated study from the command line.

``provision`` writes certificates and start-up kits; ``server`` and ``client``
are the two sides of a real deployment; ``federate`` runs both locally as
separate processes (:mod:`fedseg.federation.deploy.local`). :mod:`fedseg.cli.main` adds
``server``, ``client`` and ``federate`` to the ``fedseg`` app.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from fedseg.cli.console import console
from fedseg.cli.models import DEVICE_HELP, GPUS_HELP, PROCESSES_HELP

if TYPE_CHECKING:  # imported where used: `fedseg --help` stays fast
    from fedseg.federation.deploy.rundir import EvaluationRecord, RunDir


provision_app = typer.Typer(
    help="Create a study's certificates and start-up kits; later: add-site, renew, revoke.",
    invoke_without_command=True, no_args_is_help=False,
)

PASSPHRASE_HELP = "File whose first line is the CA key's passphrase (keep it 0600; default: the CA key is not encrypted)."


def _passphrase(path: Path | None) -> bytes | None:
    """The first line of ``path`` (a file only its owner may read), or None."""
    from fedseg.errors import FedsegError

    if path is None:
        return None
    if path.stat().st_mode & 0o077:
        raise FedsegError(f"{path} may be read by others; run: chmod 600 {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) < 8:
        raise FedsegError(f"{path}: the passphrase must be at least 8 characters")
    return line.encode("utf-8")


def _cases(text: str | None) -> dict[str, int] | None:
    """``nci=120,suny=80`` as a dict (None: not given)."""
    from fedseg.errors import FedsegError

    if text is None:
        return None
    cases: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, _, count = item.partition("=")
        if not count.strip().isdigit():
            raise FedsegError(f"--cases: {item!r} is not SITE=COUNT")
        cases[site.strip()] = int(count)
    return cases


@provision_app.callback()
def provision(
    ctx: typer.Context,
    server_name: str | None = typer.Option(None, help="Host name (or IP) the sites will connect to."),
    sites: str | None = typer.Option(None, help="Comma-separated site names, e.g. nci,suny,ucla (each becomes a certificate identity)."),
    out: Path | None = typer.Option(None, help="New folder for the kits (must not exist or be empty)."),
    port: int = typer.Option(8443, help="Server port."),
    days: int = typer.Option(825, help="Certificate validity in days (the CA: one year longer)."),
    study: str = typer.Option("fedseg-study", help="Study name written into every kit."),
    ca_passphrase_file: Path | None = typer.Option(None, "--ca-passphrase-file", help=PASSPHRASE_HELP),
    cases: str | None = typer.Option(None, help="Training cases per site, e.g. nci=120,suny=80: the server refuses updates claiming more."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation", help="Every kit requires [federation] secure_aggregation = true: the server then sees only the weighted sum of the updates, and neither it nor a site runs the study without it."),
) -> None:
    """Create a study CA, a server certificate and one client certificate per site, as start-up kits."""
    from fedseg.errors import FedsegError
    from fedseg.federation.deploy.provision import provision_study

    if ctx.invoked_subcommand is not None:
        return
    if server_name is None or sites is None or out is None:
        raise FedsegError("fedseg provision needs --server-name, --sites and --out (or a command: add-site, renew, revoke)")
    kits = provision_study(
        server_name, [s.strip() for s in sites.split(",") if s.strip()], out, days=days, study=study, port=port,
        ca_passphrase=_passphrase(ca_passphrase_file), cases=_cases(cases), secure_aggregation=secure_aggregation,
    )
    for name, folder in kits.items():
        what = "keep OFFLINE: the CA key, needed only to add sites" if name == "ca" else f"give to {name} (see {folder}/README.txt)"
        console.print(f"[green]kit[/] {folder}: {what}")


CA_HELP = "The study's CA folder (from 'fedseg provision')."
SERVER_KIT_HELP = "The server's kit folder (its study.json and crl.pem are updated)."


@provision_app.command("add-site")
def add_site(
    site: str = typer.Argument(..., help="The new site's name."),
    ca: Path = typer.Option(..., help=CA_HELP),
    server_kit: Path = typer.Option(..., "--server-kit", help=SERVER_KIT_HELP),
    out: Path = typer.Option(..., help="New folder for the site's kit."),
    days: int = typer.Option(825, help="Certificate validity in days."),
    ca_passphrase_file: Path | None = typer.Option(None, "--ca-passphrase-file", help=PASSPHRASE_HELP),
) -> None:
    """Add a site to a provisioned study: its kit, and its name in the server's kit (the server takes it at --resume)."""
    from fedseg.federation.deploy.lifecycle import add_site as add

    folder = add(ca, server_kit, site, out, days=days, passphrase=_passphrase(ca_passphrase_file))
    console.print(f"[green]kit[/] {folder}: give to {site}; restart the server with --resume to let it in")


@provision_app.command()
def renew(
    name: str = typer.Argument(..., help="A site's name, or 'server'."),
    ca: Path = typer.Option(..., help=CA_HELP),
    server_kit: Path = typer.Option(..., "--server-kit", help=SERVER_KIT_HELP),
    out: Path = typer.Option(..., help="New folder for the renewed kit."),
    days: int = typer.Option(825, help="Certificate validity in days."),
    ca_passphrase_file: Path | None = typer.Option(None, "--ca-passphrase-file", help=PASSPHRASE_HELP),
) -> None:
    """A new key and certificate for a site or the server (the old one stays valid until it expires or is revoked)."""
    from fedseg.federation.deploy.lifecycle import renew as renewed

    folder = renewed(ca, name, out, server_kit, days=days, passphrase=_passphrase(ca_passphrase_file))
    console.print(f"[green]kit[/] {folder}: the renewed kit of {name}")


@provision_app.command()
def revoke(
    name: str = typer.Argument(..., help="The site whose certificates are revoked."),
    ca: Path = typer.Option(..., help=CA_HELP),
    server_kit: Path = typer.Option(..., "--server-kit", help=SERVER_KIT_HELP),
    remove: bool = typer.Option(False, "--remove", help="Also take the site off the study (at the next --resume)."),
    ca_passphrase_file: Path | None = typer.Option(None, "--ca-passphrase-file", help=PASSPHRASE_HELP),
) -> None:
    """Revoke every certificate issued to a site so far; a running server refuses it from its next connection."""
    from fedseg.federation.deploy.lifecycle import revoke as revoked

    serials = revoked(ca, server_kit, name, remove=remove, passphrase=_passphrase(ca_passphrase_file))
    console.print(f"[green]revoked[/] {name}: serial(s) {', '.join(serials)}; then 'fedseg provision renew {name}' for a new kit")


# --------------------------------------------------------------------------- server, client, federate

KIT_HELP = "Start-up kit folder (from 'fedseg provision')."
CONFIG_HELP = "Study TOML with the tables federation, train and prepare."


def _logging() -> None:
    """INFO logs of the server/client to stderr, control characters escaped (a no-op when already configured)."""
    from fedseg.cli.console import configure_logging

    configure_logging()


def _threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def server(
    kit: Path = typer.Option(..., help=KIT_HELP),
    config: Path | None = typer.Option(None, help=CONFIG_HELP + " On --resume: default the run's own."),
    out: Path | None = typer.Option(None, "--out", help="New run directory (every completed round is kept there)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run directory after its last completed round."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int | None = typer.Option(None, help="Port (default: the kit's)."),
    fold: int = typer.Option(0, help="Cross-validation fold the sites train (recorded in the run)."),
    rounds: int | None = typer.Option(None, min=1, help="Number of rounds (overrides federation.rounds)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    cache: Path = typer.Option(
        Path.home() / ".cache" / "fedseg", help="Folder for cached starting weights (train.init = phantom)."
    ),
) -> None:
    """Run the federated server: wait for the sites, aggregate every round, keep final and best models."""
    from fedseg.errors import FedsegError
    from fedseg.federation.deploy.serverrun import ServerRun

    if (out is None) == (resume is None):
        raise FedsegError("give exactly one of --out RUN_DIR (a new run) or --resume RUN_DIR")
    _logging()
    options = {"fold": fold, "rounds": rounds, "threads": threads, "cache": cache, "say": console.print}
    if resume is not None:
        server_run = ServerRun.resume(kit, resume, config=config, **options)
    else:
        server_run = ServerRun.new(kit, config, out, **options)
    _print_summary(server_run.run(host=host, port=port))


def _print_summary(run: RunDir) -> None:
    """Every committed round of the run, the final model's test Dice per site, and the best round."""
    from rich.table import Table

    records = run.round_records()
    secure = " (secure aggregation: aggregate values only)" if any(r.secure_aggregation for r in records) else ""
    summary = Table("round", "aggregated val Dice", "sites", "left out", title=f"federated study → {run.root}{secure}")
    for entry in records:
        left = ", ".join(f"{s} ({why})" for s, why in sorted(entry.left_out.items())) or "-"
        sites = sorted(entry.sites) or sorted(entry.arrival_order)  # secure: no per-site entry, the contributors only
        summary.add_row(str(entry.round), f"{entry.aggregated_val_dice:.4f}", ", ".join(sites), left)
    console.print(summary)
    evaluation = run.evaluation()
    if evaluation is not None:
        _print_evaluation(evaluation)
    state = run.read_state()
    if state.has_best:
        console.print(f"[green]done[/]: {state.completed_rounds} rounds; best round {state.best_round} "
                      f"(val Dice {state.best_dice:.4f}); wrote final.safetensors and best.safetensors in {run.root}")


def _print_evaluation(record: EvaluationRecord) -> None:
    """The final model's test Dice per site, as the sites reported it."""
    from rich.table import Table

    table = Table("site", "test cases", "mean Dice", title="final model on each site's held-out test set")
    for site, entry in record.sites.items():
        mean = "-" if entry.mean_dice is None else f"{entry.mean_dice:.4f}"
        table.add_row(site, str(entry.n), mean)
    for site, why in record.left_out.items():
        table.add_row(site, "-", f"no result: {why}")
    console.print(table)


def client(
    kit: Path = typer.Option(..., help=KIT_HELP),
    data: Path = typer.Option(..., help="This site's folder (raw, or prepared by 'fedseg data prepare')."),
    fold: int = typer.Option(0, help="Cross-validation fold to train and validate on."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP + " Must match the server's."),
    rounds: int | None = typer.Option(None, min=1, help="Rounds this site agrees to train (overrides federation.rounds; a TRAIN beyond it is refused)."),
    cache: Path = typer.Option(Path.home() / ".cache" / "fedseg", help="Folder for preprocessed copies of the site."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log: one JSON line per update sent (default: KIT/audit.jsonl)."),
    server_url: str | None = typer.Option(None, "--server-url", help="wss://HOST:PORT (default: the kit's)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch."),
    retries: int = typer.Option(10, min=0, help="Failed reconnections allowed in a row (delay 2 s, doubling up to 30 s)."),
    models: Path | None = typer.Option(None, "--models", help="Where the final and best models received at the end are kept (default: KIT/models)."),
    share_case_names: bool = typer.Option(False, "--share-case-names", help="Send case names with the test Dice (default: case-001, case-002, ...)."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    gpus: int | None = typer.Option(None, min=1, help=GPUS_HELP),
    processes: int | None = typer.Option(None, min=1, help=PROCESSES_HELP),
) -> None:
    """Take part in a federated study: train on this site every round; only weights and scores leave."""
    import asyncio

    from fedseg.cli.models import _resolve
    from fedseg.errors import FedsegError
    from fedseg.federation.protocol.session import SiteLimits
    from fedseg.federation.transport.client import run_client
    from fedseg.federation.transport.kit import load_kit
    from fedseg.site import SiteOutputs, TorchParticipant
    from fedseg.federation.config import load_study_config
    from fedseg.models import build_model
    from fedseg.training.data import SiteData
    from fedseg.training.distributed import place_training
    from fedseg.training.engine import LocalTrainer, training_loss
    from fedseg.training.fit import fold_training_set

    _logging()
    site_kit = load_kit(kit)
    if site_kit.role != "site":
        raise FedsegError(f"{kit}: the server's kit; a client needs its site's kit")
    study = load_study_config(config)
    site_kit.require_secure_aggregation(study.federation.secure_aggregation, config)
    train = study.train if threads is None else study.train.replace(threads=threads)
    _threads(train.threads)
    placement = place_training(train, device, gpus, processes)
    train = placement.config
    site = _resolve(data, study.prepare, cache)
    site.require_splits().fold(fold)
    training = fold_training_set(site, SiteData(site, train.patch), fold)
    audit = audit_log if audit_log is not None else site_kit.directory / "audit.jsonl"
    models_dir = models if models is not None else site_kit.directory / "models"
    outputs = SiteOutputs(models_dir, site, fold, train, study.prepare, str(site_kit.study.get("study", "")))
    mu = study.federation.fedprox_mu
    console.print(f"site {site_kit.name} trains on {placement.describe()}")
    with placement.group([str(site.prepared)], fold, study.prepare.to_dict(), str(cache), mu) as parallel:
        trainer = LocalTrainer(
            build_model(train.network, seed=train.seed), training.train, training.val, train,
            loss=training_loss(mu, parallel), parallel=parallel,
        )
        asyncio.run(
            run_client(
                site_kit, TorchParticipant(trainer, outputs, site_kit.directory / "state" / f"fold{fold}"),
                server_url=server_url, audit_log=audit, retries=retries,
                share_case_names=share_case_names, settings=study.site_settings(fold),
                limits=SiteLimits(study.federation.local_epochs, rounds or study.federation.rounds),
                model_bytes=sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values()),
                secure=study.federation.secure_settings(),
            )
        )
    console.print(f"[green]done[/]: site {site_kit.name} trained {trainer.epoch} round(s) on fold {fold} "
                  f"({len(training.train)} train / {len(training.val)} val cases); final and best models in "
                  f"{models_dir}; audit log {audit}")


def federate(
    site_dirs: list[Path] = typer.Argument(..., help="Site folders; each site is named after its folder."),
    out: Path = typer.Option(..., "--out", help="New run folder (kits, logs, server runs, model/)."),
    rounds: int | None = typer.Option(None, min=1, help="Number of rounds (overrides federation.rounds)."),
    fold: int | None = typer.Option(None, help="Fold to train (default 0)."),
    all_folds: bool = typer.Option(False, "--all-folds", help="Train every fold in turn: the FL ensemble."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    cache: Path = typer.Option(Path.home() / ".cache" / "fedseg", help="Folder for preprocessed copies of the sites."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for torch in each process."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out: finished folds are kept, an interrupted one resumes after its last completed round."),
    device: str | None = typer.Option(None, help=DEVICE_HELP + " For every site process."),
    processes: int | None = typer.Option(None, min=1, help="Each site trains in N CPU processes (DDP over gloo)."),
) -> None:
    """Local mode: the server and one client per site as processes on 127.0.0.1 with real mutual TLS."""
    from rich.table import Table

    from fedseg.cli.models import _resolve
    from fedseg.errors import FedsegError
    from fedseg.federation.deploy.local import run_local, site_names
    from fedseg.federation.config import load_study_config

    if fold is not None and all_folds:
        raise FedsegError("--fold and --all-folds exclude each other")
    site_names(site_dirs)  # clear error before anything is written
    study = load_study_config(config)
    if rounds is not None:
        study = type(study)(study.federation.replace(rounds=rounds), study.train, study.prepare)
    if threads is not None:
        study = type(study)(study.federation, study.train.replace(threads=threads), study.prepare)
    if device is not None:
        from fedseg.training.device import resolve_hardware

        resolve_hardware(device, study.train.amp)  # one clear error here rather than one per site process
        study = type(study)(study.federation, study.train.replace(device=device), study.prepare)
    if all_folds:
        # prepare here (once, with progress) so the folds are known; clients reuse the cache
        n_folds = min(len(_resolve(d, study.prepare, cache).require_splits().folds) for d in site_dirs)
        folds = list(range(n_folds))
    else:
        folds = [fold or 0]
    results = run_local(
        site_dirs, out, study, folds=folds, rounds=rounds, config_file=config, cache=cache, threads=threads, resume=resume,
        device=device, site_processes=processes,
        on_exit=lambda name, code: console.print(f"{name}: exited with code {code}"),
    )
    secure = study.federation.secure_aggregation
    score = "best val Dice (site mean)" if secure else "best val Dice (site median)"
    title = f"federated → {out / 'model'}" + (" (secure aggregation: the server saw sums only)" if secure else "")
    summary = Table("fold", "rounds", "best round", score, "minutes", title=title)
    for run in results:
        summary.add_row(str(run.fold), str(run.rounds), str(run.best_round), f"{run.best_dice:.4f}", f"{run.seconds / 60:.1f}")
    console.print(summary)
    console.print(f"[green]wrote[/] FL model {out / 'model'} (use 'fedseg predict' / 'fedseg evaluate'); logs in {out / 'logs'}")
