"""The ``pacsworker`` command: serve, scp, worker, replay, run, status."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .config import CONFIG_ENV, ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML configuration file")]


def _setup(config: Path | None) -> Settings:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.resolve())  # child processes read the same file
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # pynetdicom's own INFO/DEBUG lines can dump dataset contents; keep them out of the log
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if "models" not in settings.model_fields_set:
        from .config import brain_extra_installed

        names = ", ".join(m.name for m in settings.models)
        extra = "" if brain_extra_installed() else (
            "; mr-brain is not available: install the brain extra (scripts/setup.sh does)")
        logging.getLogger("pacsworker").info("no models configured: the defaults run (%s)%s", names, extra)
    return settings


def _receiver(settings: Settings):
    from .scp.server import Receiver
    from .tasks.app import configure
    from .tasks.submit import recover, submit_series

    configure(settings)
    receiver = Receiver(settings, lambda record: submit_series(settings, record))
    last_sweep = [0.0]

    def sweep() -> None:
        if time.time() - last_sweep[0] >= min(5.0, settings.queue.stale_after_seconds / 2):
            last_sweep[0] = time.time()
            recover(settings)

    receiver.periodic.append(sweep)
    return receiver


@app.command()
def scp(config: ConfigOption = None) -> None:
    """Run the DICOM receiver (and the recovery sweeps) against the configured queue."""
    settings = _setup(config)
    _receiver(settings).serve_forever()


def _all_queues(settings: Settings) -> list[str]:
    from .tasks.app import DELIVERY_QUEUE, model_queue

    return [model_queue(m.name) for m in settings.models] + [DELIVERY_QUEUE]


def _data_dir_problem(layout) -> tuple[str, bool]:
    """Why data_dir cannot be used yet, and whether waiting can help ('' when usable)."""
    root = layout.root
    if root.exists() and not root.is_dir():
        return "it exists and is not a folder", False
    if not root.exists():
        try:
            layout.create()
        except OSError as exc:
            return f"it does not exist and cannot be created yet ({exc.strerror or exc})", True
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        return "this worker may not read and write it (same user and path as the receiver are needed)", False
    try:
        layout.create()
    except OSError as exc:
        return f"its folders cannot be created ({exc.strerror or exc})", False
    return "", False


def _wait_for_data_dir(layout, wait_seconds: float) -> str:
    """Wait (saying so) for a data_dir that may still appear, such as a mount; returns the final problem."""
    deadline = time.monotonic() + wait_seconds
    said = ""
    while True:
        problem, may_appear = _data_dir_problem(layout)
        if not problem or not may_appear or time.monotonic() >= deadline:
            return problem
        if problem != said:
            logging.getLogger("pacsworker.worker").warning(
                "waiting up to %.0f s for data_dir %s: %s", wait_seconds, layout.root, problem
            )
            said = problem
        time.sleep(1.0)


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[Optional[str], typer.Option(help="comma-separated; default: every model queue and delivery")] = None,
    pool: Annotated[str, typer.Option(help="prefork (time limits enforced), threads or solo")] = "prefork",
    concurrency: Annotated[int, typer.Option(help="one per GPU is the rule for model queues")] = 1,
    name: Annotated[Optional[str], typer.Option(help="Celery node name")] = None,
    check_models: Annotated[bool, typer.Option(help="check each model's reference cases first; serve only those that pass")] = False,
) -> None:
    """Run a queue worker: model jobs and/or deliveries."""
    settings = _setup(config)
    from .records import DataLayout
    from .tasks.app import configure

    layout = DataLayout(settings.data_dir)
    problem = _wait_for_data_dir(layout, settings.storage.wait_for_data_dir_seconds)
    if problem:
        console.print(f"[red]cannot use data_dir {layout.root}: {problem}[/red]")
        raise typer.Exit(2)
    celery_app = configure(settings)
    queue_list = (queues or ",".join(_all_queues(settings))).split(",")
    if check_models:
        queue_list = _checked_queues(settings, queue_list)
    argv = [
        "worker", "--queues", ",".join(queue_list), "--pool", pool,
        "--concurrency", str(concurrency), "--loglevel", settings.logging.level, "--without-mingle",
        "--without-gossip",
    ]
    if name:
        argv += ["--hostname", name]
    celery_app.worker_main(argv)


def _checked_queues(settings: Settings, queue_list: list[str]) -> list[str]:
    """The queues left after each model's reference cases ran: a model that fails is not served."""
    from .tasks.app import model_queue
    from .worker.checks import check_model

    log = logging.getLogger("pacsworker.worker")
    kept = list(queue_list)
    for model in settings.models:
        if model_queue(model.name) not in kept or not model.tests:
            continue
        results = check_model(model)
        failures = [line for r in results for line in r.checks if not r.passed and line.startswith("FAIL")]
        if any(not r.passed for r in results):
            kept.remove(model_queue(model.name))
            log.error("model %s failed its reference cases and is not served by this worker: %s",
                      model.name, "; ".join(failures) or "did not run")
        else:
            log.info("model %s passed its %d reference case(s)", model.name, len(results))
    if not kept:
        console.print("[red]no queue left to serve: every model failed its reference cases[/red]")
        raise typer.Exit(2)
    return kept


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Receiver, embedded queue and workers in one command (the single-machine setup)."""
    settings = _setup(config)
    from .tasks.app import DELIVERY_QUEUE

    from .records import DataLayout

    DataLayout(settings.data_dir).create()  # before the workers start, so none waits for it
    model_queues = ",".join(q for q in _all_queues(settings) if q != DELIVERY_QUEUE)
    specs = {
        "model": ["--queues", model_queues, "--pool", "prefork", "--concurrency", "1", "--name", "model@%h"],
        "delivery": ["--queues", DELIVERY_QUEUE, "--pool", "threads", "--concurrency", "4", "--name", "delivery@%h"],
    }
    children: dict[str, subprocess.Popen] = {}

    def spawn(role: str) -> None:
        children[role] = subprocess.Popen([sys.executable, "-m", "pacsworker", "worker", *specs[role]])

    for role in specs:
        spawn(role)
    receiver = _receiver(settings)

    def supervise() -> None:
        for role, child in list(children.items()):
            if child.poll() is not None:
                logging.getLogger("pacsworker.serve").error("%s worker exited with %s; restarting", role, child.returncode)
                spawn(role)

    receiver.periodic.append(supervise)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        receiver.serve_forever()
    finally:
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()


@app.command()
def replay(
    paths: Annotated[list[Path], typer.Argument(help="files or folders to send")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 11112,
    aec: Annotated[str, typer.Option(help="called AE title")] = "PACSWORKER",
    aet: Annotated[str, typer.Option(help="calling AE title")] = "PACSWORKER-SCU",
    config: ConfigOption = None,
) -> None:
    """Send DICOM files to a receiver with C-STORE, with a progress bar."""
    from .replay import collect_files
    from .replay import replay as send

    total = len(collect_files(list(paths)))
    with Progress(console=console) as progress:
        bar = progress.add_task(f"C-STORE to {aec}@{host}:{port}", total=total)
        try:
            report = send(list(paths), host, port, aec, aet, progress=lambda _: progress.advance(bar))
        except (ConnectionError, ValueError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    console.print(f"sent {report.sent}, refused {len(report.failed)}, not DICOM {len(report.not_dicom)}")
    for path, reason in report.failed:
        console.print(f"  refused: {path} ({reason})")
    for path in report.not_dicom:
        console.print(f"  not DICOM, skipped: {path}")
    if report.failed:
        raise typer.Exit(1)


def _model_or_exit(settings: Settings, name: str):
    """The configured model of that name, or exit 2 saying none is configured."""
    try:
        return settings.model(name)
    except KeyError as exc:
        console.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(2) from None


@app.command()
def run(
    series_dir: Annotated[Path, typer.Argument(help="folder holding one series")],
    model: Annotated[str, typer.Option(help="model name from the configuration")] = "ct-body",
    out: Annotated[Path, typer.Option(help="folder for the results")] = Path("out"),
    config: ConfigOption = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="write overlay.png (mask outlines and boxes)")] = True,
) -> None:
    """Run a model over one series folder: SEG + SR, the mask as NIfTI, a PNG overlay; no queue."""
    settings = _setup(config)
    from .replay import collect_files
    from .worker.adapters import ModelLoadError
    from .worker.export import write_nifti, write_overlay_png
    from .worker.outputs import ModelOutputError, ModelRunError
    from .worker.runtime import run_model, write_values
    from .worker.series import Series
    from .worker.volume import NotAVolumeError

    model_settings = _model_or_exit(settings, model)
    try:
        outcome = run_model(collect_files([series_dir]), model_settings)
    except NotAVolumeError as exc:
        console.print(f"[yellow]no result: {exc}[/yellow]")
        raise typer.Exit(3) from None
    except (ModelLoadError, ModelOutputError, ModelRunError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(4) from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if outcome.label_map is not None or outcome.boxes:
        series = Series(outcome.volume)
        labels = outcome.label_map.array if outcome.label_map is not None else None
        if labels is not None:
            written += write_nifti(series, labels, out)
        if png:
            written.append(write_overlay_png(series, labels, out / "overlay.png", outcome.boxes))
    values = write_values(outcome, out)
    if values:
        written.append(values)
        for key, value in outcome.values.items():
            console.print(f"{key}: {json.dumps(value)}")
    for name, ds in outcome.result_objects().items():
        ds.save_as(out / name, enforce_file_format=True)
        written.append(out / name)
    if outcome.app_log:  # a MONAI Deploy application's log and its other files, for a look
        (out / "app.log").write_text(outcome.app_log)
        written.append(out / "app.log")
    for name, data in outcome.app_files.items():
        path = (out / "app-files" / name).resolve()
        if path.is_relative_to((out / "app-files").resolve()):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for stat in outcome.statistics:
        console.print(f"{stat.spec.name}: {stat.volume_ml:.1f} mL, mean {stat.mean_value:.1f}")
    if written:
        console.print(f"wrote {', '.join(p.name for p in written)} to {out} "
                      f"({', '.join(f'{k} {v:.2f}s' for k, v in outcome.timings.items())})")
    if outcome.withheld:
        console.print(f"[red]withheld: {outcome.reason}[/red]")
        raise typer.Exit(6)
    for failure in outcome.implausible:
        console.print(f"[yellow]flagged (on_fail: flag): {failure}[/yellow]")
    if not outcome.has_results:
        console.print(f"[yellow]no result: {outcome.reason}[/yellow]")
        raise typer.Exit(3)
    if outcome.problems:  # written for inspection; the queue would not deliver them
        for problem in outcome.problems:
            console.print(f"[red]validation: {problem}[/red]")
        raise typer.Exit(5)


models_app = typer.Typer(no_args_is_help=True, help="The configured models: list them, test them.")
app.add_typer(models_app, name="models")


def _rule_summary(model) -> str:
    rule = model.match
    parts = [f"{k}={v}" for k, v in rule.model_dump().items()
             if v not in ([], "", 0) and k not in ("sop_class_uids",)]
    return ", ".join(parts)


@models_app.command("list")
def models_list(config: ConfigOption = None) -> None:
    """Name, kind, version, device and routing rules of every configured model (nothing is loaded)."""
    settings = _setup(config)
    import torch

    table = Table(title="models")
    for column in ("name", "kind", "source", "version", "device", "routing", "reference cases"):
        table.add_column(column)
    for model in settings.models:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if model.device == "auto" else model.device
        device = "remote" if model.kind in ("triton", "arterys") else device
        where = {"triton": f"{model.url} {model.model_name or ''}".strip(), "arterys": model.url or "",
                 "monai-deploy": model.command or model.source}.get(model.kind, model.source)
        table.add_row(model.name, model.kind, where, model.version or "(from the model)", device,
                      _rule_summary(model), str(len(model.tests)))
    Console().print(table)


@models_app.command("test")
def models_test(
    name: Annotated[str, typer.Argument(help="model name from the configuration")],
    folder: Annotated[Optional[Path], typer.Argument(help="a series to run it on (optional)")] = None,
    config: ConfigOption = None,
) -> None:
    """Load a model, run it on FOLDER with timings, and check its reference cases (exit 1 on a failure)."""
    settings = _setup(config)
    from .replay import collect_files
    from .worker.checks import check_model
    from .worker.runtime import get_model, run_model

    model = _model_or_exit(settings, name)
    started = time.perf_counter()
    try:
        loaded = get_model(model)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    out = Console()
    out.print(f"{name}: loaded in {time.perf_counter() - started:.2f} s on {loaded.device}, version {loaded.identity.version}")
    if folder is not None:
        for run in ("first", "second"):
            outcome = run_model(collect_files([folder]), model)
            timings = ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items())
            found = "; ".join(f"{s.spec.name} {s.volume_ml:.1f} mL" for s in outcome.statistics) or outcome.reason
            if outcome.implausible and not outcome.withheld:
                found += "; flagged: " + "; ".join(outcome.implausible)
            out.print(f"{run} run on {folder}: {timings}; {found}")
    failed = 0
    for result in check_model(model):
        failed += not result.passed
        out.print(f"{'PASS' if result.passed else 'FAIL'} {result.case.input} ({result.seconds:.2f} s)")
        for line in result.checks:
            out.print(f"  {line}")
    if not model.tests:
        out.print("no reference cases configured (tests: in the model's configuration)")
    if failed:
        raise typer.Exit(1)


series_app = typer.Typer(no_args_is_help=True, help="Received series: force what the receiver would decide.")
app.add_typer(series_app, name="series")


@series_app.command("complete")
def series_complete(
    series_uid: Annotated[str, typer.Argument(help="Series Instance UID of a series being received")],
    config: ConfigOption = None,
) -> None:
    """Complete a series now instead of waiting for its quiet time (the receiver acts within a second)."""
    settings = _setup(config)
    from .records import DataLayout, SeriesRecord, SeriesState, read_json

    layout = DataLayout(settings.data_dir).create()
    try:
        marker = layout.completion_request(series_uid)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    record = read_json(layout.series_record(series_uid), SeriesRecord)
    if record is None:
        console.print(f"[red]no series {series_uid} in {layout.root}[/red]")
        raise typer.Exit(2)
    if record.state != SeriesState.RECEIVING:
        console.print(f"series {series_uid} is not being received: it is {record.state.value}")
        raise typer.Exit(1)
    from .scp.spool import series_files

    marker.touch()
    received = len(series_files(layout.series_dir(series_uid)))
    console.print(f"series {series_uid} ({received} instances so far) will be completed by the receiver")


@app.command()
def pull(
    study: Annotated[str, typer.Option(help="Study Instance UID to fetch")],
    series: Annotated[Optional[str], typer.Option(help="only this Series Instance UID")] = None,
    config: ConfigOption = None,
) -> None:
    """Fetch a study from scp.pull_url (WADO-RS) into the running receiver, as if it had been sent."""
    settings = _setup(config)
    import requests

    scp = settings.scp
    if scp.stow_port is None or not scp.pull_url:
        console.print("[red]pull needs scp.stow_port (the receiver's DICOMweb port) and scp.pull_url[/red]")
        raise typer.Exit(2)
    host = "127.0.0.1" if scp.host in ("0.0.0.0", "::") else scp.host
    try:
        answer = requests.post(f"http://{host}:{scp.stow_port}/pull", json={"study": study, "series": series},
                               timeout=3600)
    except requests.RequestException as exc:
        console.print(f"[red]the receiver does not answer on port {scp.stow_port}: {exc}[/red]")
        raise typer.Exit(1) from None
    if answer.status_code != 200:
        console.print(f"[red]pull refused ({answer.status_code}): {answer.text}[/red]")
        raise typer.Exit(1)
    result = answer.json()
    console.print(f"study {study}: {len(result['series'])} series, {result['stored']} instance(s) stored, "
                  f"{len(result['refused'])} refused")
    for item in result["refused"]:
        console.print(f"  refused {item['sop_instance_uid']} (0x{item['status']:04X}): {item['reason']}")
    if result["refused"]:
        raise typer.Exit(1)


rules_app = typer.Typer(no_args_is_help=True, help="Routing rules: which series go to which model.")
app.add_typer(rules_app, name="rules")


@rules_app.command("test")
def rules_test(
    paths: Annotated[list[Path], typer.Argument(help="folders or files of DICOM series")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """For every series found: the model(s) it would go to, and for each other model the first rule it fails."""
    settings = _setup(config)
    import pydicom

    from .records import SeriesRecord
    from .replay import collect_files
    from .scp.routing import match_reason, series_facts

    series: dict[str, SeriesRecord] = {}
    for path in collect_files(list(paths)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - not DICOM, or no series: not a routing question
            continue
        if uid not in series:
            series[uid] = SeriesRecord(
                series_uid=uid, study_uid=str(ds.get("StudyInstanceUID", "")), modality=str(ds.get("Modality", "")),
                sop_class_uid=str(ds.get("SOPClassUID", "")), calling_aet="", **series_facts(ds),
            )
        series[uid].instances += 1
    report = []
    for record in series.values():
        reasons = {model.name: match_reason(record, model) for model in settings.models}
        report.append({
            "series_uid": record.series_uid, "description": record.series_description, "modality": record.modality,
            "instances": record.instances, "models": [name for name, reason in reasons.items() if not reason],
            "not": {name: reason for name, reason in reasons.items() if reason},
        })
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"routing of {len(report)} series")
    for column in ("series", "modality", "instances", "goes to", "not to (first failed rule)"):
        table.add_column(column)
    for row in report:
        table.add_row(
            f"{row['series_uid']}\n{row['description']}", row["modality"], str(row["instances"]),
            ", ".join(row["models"]) or "skipped",
            "\n".join(f"{name}: {reason}" for name, reason in row["not"].items()),
        )
    Console().print(table)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Pending series, jobs by state, pending deliveries (read from data_dir)."""
    settings = _setup(config)
    from .records import DataLayout, JobRecord, SeriesRecord, SeriesState

    layout = DataLayout(settings.data_dir).create()
    series = list(layout.iter_records(layout.series, SeriesRecord))
    jobs = list(layout.iter_records(layout.jobs, JobRecord))
    deliveries = [d for d in layout.iter_deliveries() if not d.complete]
    report = {
        "series": dict(Counter(s.state.value for s in series)),
        "pending_series": [s.series_uid for s in series if s.state == SeriesState.RECEIVING],
        "series_jobs": {s.series_uid: {"state": s.state.value, "jobs": s.jobs} for s in series if s.jobs},
        "skipped_series": {s.series_uid: s.reason for s in series if s.state == SeriesState.SKIPPED},
        "jobs": dict(Counter(j.state.value for j in jobs)),
        "failed_jobs": {j.job_id: j.reason for j in jobs if j.state.value in ("failed", "no-result")},
        "implausible_jobs": {j.job_id: j.reason for j in jobs if j.state.value == "implausible"},
        "flagged_jobs": {j.job_id: "delivered flagged: " + "; ".join(j.implausible)
                         for j in jobs if j.implausible and j.state.value != "implausible"},
        "pending_deliveries": {
            d.job_id: {name: o.last_error for name, o in d.destinations.items() if o.state.value != "delivered"}
            for d in deliveries
        },
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out = Console()
    table = Table(title=f"pacsworker status ({layout.root})")
    table.add_column("what")
    table.add_column("count / detail")
    for state, count in sorted(report["series"].items()):
        table.add_row(f"series {state}", str(count))
    for state, count in sorted(report["jobs"].items()):
        table.add_row(f"jobs {state}", str(count))
    table.add_row("pending deliveries", str(len(deliveries)))
    for uid, reason in report["skipped_series"].items():
        table.add_row(f"skipped {uid}", reason)
    for job_id, reason in report["failed_jobs"].items():
        table.add_row(f"no result {job_id}", reason)
    for job_id, reason in report["implausible_jobs"].items():
        table.add_row(f"withheld {job_id}", reason)
    for job_id, reason in report["flagged_jobs"].items():
        table.add_row(f"flagged {job_id}", reason)
    out.print(table)
