"""The ``pacsworker`` command: serve, scp, worker, replay, run, status."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .config import (
    CONFIG_ENV,
    ArterysModelSettings,
    ConfigError,
    MonaiDeployModelSettings,
    Settings,
    TritonModelSettings,
    load_settings,
)
from .logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

SERVE_CHILD_ENV = "PACSWORKER_SERVE_CHILD"  # set for the workers serve starts: they say less at start
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration file")]


def _setup(config: Path | None, runs_models: bool = True) -> Settings:
    """Settings and logging; ``runs_models``: say which default models run (not for read-only commands)."""
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.resolve())  # child processes read the same file
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    configure_logging(settings.logging.level, settings.logging.format)
    if not settings.queue.broker_url:  # kombu's "no hostname was supplied" about the embedded broker
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    if runs_models and "models" not in settings.model_fields_set and not os.environ.get(SERVE_CHILD_ENV):
        from .config import brain_extra_installed

        names = ", ".join(m.name for m in settings.models)
        extra = "" if brain_extra_installed() else (
            "; mr-brain is not available: install the brain extra (scripts/setup.sh does)")
        logging.getLogger("pacsworker").info("no models configured: the defaults run (%s)%s", names, extra)
    return settings


def _receiver(settings: Settings):
    import threading

    from .scp.server import Receiver
    from .tasks.app import configure
    from .tasks.submit import complete_studies, recover, submit_series

    configure(settings)
    if settings.scp.stow_port is not None:
        _door_or_exit(settings.scp.stow_auth, "scp.stow_auth")
    receiver = Receiver(settings, lambda record: submit_series(settings, record))
    # the recovery sweep runs in a thread of its own: it never delays series completion
    every = min(5.0, settings.queue.stale_after_seconds / 2)
    stopped = threading.Event()

    def sweeps() -> None:
        while not stopped.wait(every):
            try:
                recover(settings)
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the receiver
                logging.getLogger("pacsworker.tasks").exception("recovery sweep failed; will run again")

    sweeper = threading.Thread(target=sweeps, name="recovery-sweep", daemon=True)

    def start_sweeps() -> None:  # with the receiver's first tick: a receiver only built starts nothing
        if not sweeper.is_alive() and not stopped.is_set():
            sweeper.start()

    receiver.periodic.append(start_sweeps)
    receiver.on_stop.append(stopped.set)
    receiver.periodic.append(_receiver_heartbeat(settings, receiver))
    last_studies = [0.0]

    def studies() -> None:  # also when no study model is left: their waiting series are settled
        if time.time() - last_studies[0] >= 5.0:
            last_studies[0] = time.time()
            complete_studies(settings, {record.study_uid for record in receiver.tracker.pending()})

    receiver.periodic.append(studies)
    return receiver


@app.command()
def scp(config: ConfigOption = None) -> None:
    """Run the DICOM receiver (and the recovery sweeps) against the configured queue."""
    settings = _setup(config, runs_models=False)
    receiver = _receiver(settings)
    _ops_port(settings, "scp", receiver)
    from .start_up import scp_banner

    _print_start_up("scp", scp_banner(settings))
    _stop_on_sigterm()
    _serve_or_exit(receiver)
    _log_stopped()


def _stop_on_sigterm() -> None:
    """SIGTERM stops the process as Ctrl+C does: the receiver closes, the workers finish, it says so."""
    stopping: list[int] = []

    def stop(signum, _frame):
        if stopping:  # a second signal (to the process and to its group) must not cut the stop short
            return
        stopping.append(signum)
        logging.getLogger("pacsworker").info("pacsworker stopping (%s)", signal.Signals(signum).name)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _log_stopped() -> None:
    logging.getLogger("pacsworker").info("pacsworker stopped")


def _serve_or_exit(receiver) -> None:
    """Serve until stopped (Ctrl+C, or SIGTERM with :func:`_stop_on_sigterm`); a port that cannot be
    opened ends the process with the reason (exit 2)."""
    try:
        try:
            receiver.start()
        except OSError as exc:
            cfg = receiver.settings.scp
            console.print(f"[red]the receiver cannot listen on {cfg.host} (port {cfg.port}"
                          f"{f', TLS {cfg.tls.port}' if cfg.tls else ''}"
                          f"{f', STOW-RS {cfg.stow_port}' if cfg.stow_port else ''}): {exc.strerror or exc}[/red]")
            raise typer.Exit(2) from None
        while True:  # a signal the kernel gives another thread runs its handler once this thread wakes: soon
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()


RECEIVER_HEARTBEAT_SECONDS = 5.0


def _receiver_heartbeat(settings: Settings, receiver):
    """A duty that records, every few seconds, that this receiver is up (``status`` reads it)."""
    import socket

    from .ledger import open_ledger

    cfg = settings.scp
    ports = {"dimse": cfg.port} if cfg.plain else {}
    ports.update({"tls": cfg.tls.port} if cfg.tls else {})
    ports.update({"stow": cfg.stow_port} if cfg.stow_port else {})
    ports.update({"metrics": settings.metrics.port} if settings.metrics.enabled else {})
    host = socket.gethostname()
    receiver_id = f"{host}-{cfg.port}"
    last = [0.0]

    def beat() -> None:
        if time.time() - last[0] < RECEIVER_HEARTBEAT_SECONDS:
            return
        started = not last[0]
        last[0] = time.time()
        open_ledger(settings, "scp").receiver_heartbeat(
            receiver_id, host=host, pid=os.getpid(), ae_title=cfg.ae_title, ports=ports,
            receiving={r.series_uid: r.instances for r in receiver.tracker.pending()},
            short_of_space=receiver.space_short() is not None, started=started)

    return beat


def _multiprocess_metrics() -> None:
    """One metrics folder for this process and the processes it starts (their sums are served).

    Set before prometheus_client is first imported, which reads it at import. Folders that
    processes killed outright left behind are removed.
    """
    import atexit
    import shutil
    import tempfile

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # a child of serve (or of a worker): the parent's folder
    for stale in Path(tempfile.gettempdir()).glob("pacsworker-metrics-*"):
        try:
            os.kill(int(stale.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass
    folder = tempfile.mkdtemp(prefix=f"pacsworker-metrics-{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, True)


def _door_or_exit(section, where: str) -> None:
    """Read an HTTP door's users or tokens file now: a bad one stops the start, naming file and line."""
    from .http_auth import AuthFileError, authenticator

    try:
        authenticator(section)
    except AuthFileError as exc:
        console.print(f"[red]{where}: {exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


def _ops_port(settings: Settings, role: str, receiver=None, port: int | None = None) -> None:
    """The metrics/health/status port of this process, stopped with the receiver when there is one.

    A worker's pool processes, forked after it started, close their inherited copy of the socket.
    """
    from .ops_http import start_ops_server, watch

    if settings.metrics.enabled:
        _door_or_exit(settings.metrics.auth, "metrics.auth")

    server = start_ops_server(settings, role, port)
    if server is not None and receiver is not None:
        receiver.on_stop.append(watch(receiver.parts))
        receiver.on_stop.append(server.shutdown)
    if server is not None and role == "worker":
        from celery.signals import worker_process_init, worker_ready

        worker_process_init.connect(lambda **_: server.close_inherited(), weak=False)
        worker_ready.connect(lambda sender, **_: watch(_pool_parts(sender.controller)), weak=False)


def _pool_parts(controller):
    """/healthz's view of a Celery worker: its consumer runs, and a prefork pool has live processes."""
    from celery import bootsteps

    def parts() -> dict[str, str]:
        if controller.blueprint.state != bootsteps.RUN:
            return {"worker": "stopped"}
        processes = getattr(getattr(controller.pool, "_pool", None), "_pool", None)  # prefork: billiard's
        if processes is None:  # threads or solo: the tasks run in this process
            return {"worker pool": "ok"}
        alive = sum(1 for process in processes if process.is_alive())
        return {"worker pool": "ok" if alive else f"none of its {len(processes)} processes is alive"}

    return parts


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
    queues: Annotated[str | None, typer.Option(help="comma-separated; default: every model queue and delivery")] = None,
    pool: Annotated[str, typer.Option(help="prefork (time limits enforced), threads or solo")] = "prefork",
    concurrency: Annotated[int, typer.Option(help="one per GPU is the rule for model queues")] = 1,
    name: Annotated[str | None, typer.Option(help="Celery node name")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="its metrics/health port; default metrics.worker_port, "
                                                        "0: none")] = None,
    check_models: Annotated[
        bool, typer.Option(help="check each model's reference cases first; serve only those that pass")
    ] = False,
) -> None:
    """Run a queue worker: model jobs and/or deliveries."""
    child_of_serve = bool(os.environ.get(SERVE_CHILD_ENV))
    _multiprocess_metrics()  # before prometheus_client is imported: pool children count into it
    settings = _setup(config)
    # after _multiprocess_metrics: metrics imports prometheus_client
    from .metrics import queue_names
    from .records import DataLayout
    from .tasks.app import configure, quiet_celery_shutdown, quiet_celery_start_up

    layout = DataLayout(settings.data_dir)
    problem = _wait_for_data_dir(layout, settings.storage.wait_for_data_dir_seconds)
    if problem:
        console.print(f"[red]cannot use data_dir {layout.root}: {problem}[/red]")
        raise typer.Exit(2)
    celery_app = configure(settings)
    queue_list = (queues or ",".join(queue_names(settings))).split(",")
    if check_models:
        queue_list = _checked_queues(settings, queue_list)
    port = settings.metrics.worker_port if metrics_port is None else metrics_port
    if not child_of_serve:  # serve's own port shows its workers; serve printed what matters
        _ops_port(settings, "worker", port=port)
        from .start_up import worker_banner

        _print_start_up("worker", worker_banner(settings, queue_list, pool, concurrency, port))
    else:  # Celery's root-user warning and shutdown words are noise there: serve says it stops, once
        import warnings

        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", category=SecurityWarning)
        quiet_celery_shutdown()
    quiet_celery_start_up(settings)
    _warm_up_models(settings, queue_list, pool, child_of_serve)
    argv = [
        "--quiet",  # our start-up lines instead of Celery's banner
        "worker", "--queues", ",".join(queue_list), "--pool", pool,
        "--concurrency", str(concurrency), "--loglevel", settings.logging.level, "--without-mingle",
        "--without-gossip",
    ]
    if name:
        argv += ["--hostname", name]
    try:
        celery_app.worker_main(argv)
    finally:
        if not child_of_serve:
            _log_stopped()


def _warm_up_models(settings: Settings, queue_list: list[str], pool: str, child_of_serve: bool) -> None:
    """Load every model whose queue this worker consumes before its first job, in the process that
    runs the jobs (prefork: each pool process, on its own device), and say which can be used.

    A model that does not load stays served: its jobs fail at once with the reason (never wait in
    a queue nobody consumes), and each job tries to load it again.
    """
    from .tasks.queues import model_queue

    models = [model for model in settings.models if model_queue(model.name) in queue_list]
    if not models:
        return

    def warm_up(**_) -> None:
        from celery.worker import state

        from .worker.readiness import warm_up

        if state.should_stop is not None or state.should_terminate is not None:
            return  # a pool process replaced while the worker stops: it takes no job
        log = logging.getLogger("pacsworker.worker")
        found = warm_up(models)
        for model in found:
            level = logging.ERROR if not model.usable else logging.INFO if model.reachable else logging.WARNING
            log.log(level, model.line())
        if not any(model.usable for model in found):
            log.error("NO MODEL CAN BE USED: %s", "the receiver still receives and keeps every series, but each job "
                      "fails with its model's reason above until the model is fixed" if child_of_serve else
                      "each job this worker takes fails with its model's reason above until the model is fixed")

    if pool == "prefork":
        from celery.signals import worker_process_init

        worker_process_init.connect(warm_up, weak=False)
    else:  # the worker's own process runs the jobs
        warm_up()


def _checked_queues(settings: Settings, queue_list: list[str]) -> list[str]:
    """The queues left after each model's reference cases ran: a model that fails is not served."""
    from .tasks.queues import model_queue
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
    _multiprocess_metrics()  # its workers count into the folder its port sums
    settings = _setup(config)
    from .records import DataLayout
    from .tasks.queues import DELIVERY_QUEUE

    DataLayout(settings.data_dir).create()  # before the workers start, so none waits for it
    from .metrics import queue_names

    model_queues = ",".join(q for q in queue_names(settings) if q != DELIVERY_QUEUE)
    specs = {
        "model": ["--queues", model_queues, "--pool", "prefork", "--concurrency", "1", "--name", "model@%h"],
        "delivery": ["--queues", DELIVERY_QUEUE, "--pool", "threads", "--concurrency", "4", "--name", "delivery@%h"],
    }
    children: dict[str, subprocess.Popen] = {}

    def spawn(role: str) -> None:
        children[role] = subprocess.Popen([sys.executable, "-m", "pacsworker", "worker", *specs[role]],
                                          env={**os.environ, SERVE_CHILD_ENV: "1"})

    for role in specs:
        spawn(role)
    receiver = _receiver(settings)
    _ops_port(settings, "serve", receiver)
    from .ops_http import watch
    from .start_up import serve_banner

    _print_start_up("serve", serve_banner(settings))

    def supervise() -> None:
        for role, child in list(children.items()):
            if child.poll() is not None:
                logging.getLogger("pacsworker.serve").error("%s worker exited with %s; restarting", role, child.returncode)
                spawn(role)

    receiver.periodic.append(supervise)
    receiver.on_stop.append(watch(lambda: {
        f"{role} worker": "ok" if child.poll() is None else f"exited with {child.returncode} (restarted within 1 s)"
        for role, child in children.items()}))

    _stop_on_sigterm()
    try:
        _serve_or_exit(receiver)
    finally:
        logging.getLogger("pacsworker").info("receiver closed; the workers finish their current task (at most 20 s)")
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
    _log_stopped()


def _print_start_up(role: str, lines: list[str]) -> None:
    """What an operator needs to know at start (:mod:`pacsworker.start_up`), as one block."""
    console.print(f"pacsworker {role}\n  " + "\n  ".join(lines), highlight=False, soft_wrap=True, markup=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    config: ConfigOption = None,
    port: Annotated[int, typer.Option(help="Flower's HTTP port")] = 5555,
) -> None:
    """Flower, Celery's web monitor, on the configured queue (Redis or the embedded broker).

    Flower's own options pass through as --name=value (--address=127.0.0.1, --basic-auth=user:password).
    """
    import importlib.util

    if importlib.util.find_spec("flower") is None:
        console.print("[red]Flower is not installed: pip install 'pacsworker[monitor]'[/red]")
        raise typer.Exit(2)
    settings = _setup(config, runs_models=False)
    from .tasks.app import configure

    raise typer.Exit(configure(settings).start(["flower", f"--port={port}", *ctx.args]) or 0)


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
    """The configured model of that name, or exit 2 naming the models there are (and the nearest)."""
    import difflib

    try:
        return settings.model(name)
    except KeyError as exc:
        names = [m.name for m in settings.models]
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        configured = f"configured: {', '.join(names)}" if names else "no model is configured"
        console.print(f"[red]{exc.args[0]} ({configured}){hint}[/red]")
        raise typer.Exit(2) from None


def _print_model_traceback(exc: Exception) -> None:
    """What a model's own code raised, where (file and line), as the job record keeps it."""
    if getattr(exc, "traceback", ""):
        console.print(exc.traceback, markup=False, highlight=False, soft_wrap=True)  # type: ignore[attr-defined]


@app.command()
def run(
    series_dir: Annotated[Path, typer.Argument(help="folder holding one series")],
    model: Annotated[str, typer.Option(help="model name from the configuration")] = "ct-body",
    out: Annotated[Path, typer.Option(help="folder for the results")] = Path("out"),
    config: ConfigOption = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="write overlay.png (mask outlines and boxes)")] = True,
) -> None:
    """Run a model over one series folder: SEG + SR, the mask as NIfTI, a PNG overlay; no queue.

    \b
    Exit codes:
      0  results written, valid
      2  invalid configuration, or no model of that name
      3  no result: not one volume (or several series), or nothing found
      4  the model failed (load, run, outputs) or pixels undecodable
      5  results failed validation (written to --out, not deliverable)
      6  results withheld: a plausibility check failed
    """
    settings = _setup(config)
    from .replay import collect_files
    from .worker.adapters import ModelLoadError
    from .worker.export import run_summary, write_nifti, write_overlay_png
    from .worker.outputs import ModelOutputError, ModelRunError
    from .worker.runtime import run_model, write_values
    from .worker.series import Series
    from .worker.volume import NotAVolumeError, UndecodablePixelData

    model_settings = _model_or_exit(settings, model)
    try:
        outcome = run_model(collect_files([series_dir]), model_settings)
    except NotAVolumeError as exc:
        console.print(f"[yellow]no result: {exc}[/yellow]")
        raise typer.Exit(3) from None
    except (ModelLoadError, ModelOutputError, ModelRunError, UndecodablePixelData) as exc:
        console.print(f"[red]{exc}[/red]")
        _print_model_traceback(exc)
        raise typer.Exit(4) from None
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if outcome.label_map is not None or outcome.boxes:
        if outcome.volume is None:  # run_model loads the volume before the model gives labels or boxes
            raise RuntimeError("a label map or boxes without the series' volume")
        series = Series(outcome.volume)
        labels = outcome.label_map.array if outcome.label_map is not None else None
        if labels is not None:
            written += write_nifti(series, labels, out)
        if png:
            segments = outcome.label_map.segments if outcome.label_map is not None else ()
            written.append(write_overlay_png(series, labels, out / "overlay.png", outcome.boxes, segments))
    values = write_values(outcome, out)
    if values:
        written.append(values)
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
    summary = Console()  # what was found and written, on stdout; problems stay on stderr
    for line in run_summary(outcome):  # the whole record is outputs.json
        summary.print(line, markup=False, highlight=False, soft_wrap=True)
    if written:
        summary.print(f"wrote ({', '.join(f'{k} {v:.2f}s' for k, v in outcome.timings.items())}):", soft_wrap=True)
        for path in written:
            summary.print(f"  {path}", markup=False, highlight=False, soft_wrap=True)
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
    """The routing rule as it applies, every key with its defaults filled in, one per line."""
    from pydicom.uid import UID

    lines = []
    for key, value in model.match.model_dump().items():
        if key == "sop_class_uids" and value:
            value = ", ".join(UID(v).name for v in value)  # the name, or the UID itself when pydicom knows none
        elif key in ("min_instances", "max_instances"):
            value = f"{value} images" if value else "no maximum"
        elif key == "series_description_exclude":
            value = value or "none"
        elif isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{key}: {value or 'any'}")
    return "\n".join(lines)


@models_app.command("list")
def models_list(config: ConfigOption = None) -> None:
    """Name, kind, version, device and routing rules of every configured model (nothing is loaded)."""
    settings = _setup(config, runs_models=False)
    import torch

    table = Table(title="models")
    for column in ("name", "kind", "source", "version", "device", "routing", "reference cases"):
        table.add_column(column)
    for model in settings.models:
        device = getattr(model, "device", "auto")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        device = "remote" if model.kind in ("triton", "arterys") else device
        where: str | None
        if isinstance(model, TritonModelSettings):
            where = f"{model.url} {model.model_name}"
        elif isinstance(model, ArterysModelSettings):
            where = model.url
        elif isinstance(model, MonaiDeployModelSettings):
            where = model.command or model.source
        else:
            where = model.source
        table.add_row(model.name, model.kind, where, model.version or "(from the model)", device,
                      _rule_summary(model), str(len(model.tests)))
    Console().print(table)


@models_app.command("test")
def models_test(
    name: Annotated[str, typer.Argument(help="model name from the configuration")],
    folder: Annotated[Path | None, typer.Argument(help="a series to run it on (optional)")] = None,
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
    out.print(f"{name}: loaded in {time.perf_counter() - started:.2f} s on {loaded.device}, "
              f"version {loaded.identity.version}")
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
    settings = _setup(config, runs_models=False)
    from .ledger import open_ledger
    from .records import DataLayout, SeriesState

    layout = DataLayout(settings.data_dir).create()
    try:
        marker = layout.completion_request(series_uid)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    record = open_ledger(settings, "cli").series(series_uid)
    if record is None:
        console.print(f"[red]no series {series_uid} in {layout.root}[/red]")
        raise typer.Exit(2)
    if record.state != SeriesState.RECEIVING.value:
        console.print(f"series {series_uid} is not being received: it is {record.state}")
        raise typer.Exit(1)
    from .scp.spool import series_files

    marker.touch()
    received = len(series_files(layout.series_dir(series_uid)))
    console.print(f"series {series_uid} ({received} instances so far) will be completed by the receiver")


@app.command()
def pull(
    study: Annotated[str, typer.Option(help="Study Instance UID to fetch")],
    series: Annotated[str | None, typer.Option(help="only this Series Instance UID")] = None,
    user: Annotated[str | None, typer.Option(
        help="a user of scp.stow_auth's basic login (the password is asked for, or read from stdin)")] = None,
    token_file: Annotated[Path | None, typer.Option(help="a file holding a bearer token for scp.stow_auth")] = None,
    config: ConfigOption = None,
) -> None:
    """Fetch a study from scp.pull_url (WADO-RS) into the running receiver, as if it had been sent."""
    settings = _setup(config, runs_models=False)
    import requests

    scp = settings.scp
    if scp.stow_port is None or not scp.pull_url:
        console.print("[red]pull needs scp.stow_port (the receiver's DICOMweb port) and scp.pull_url[/red]")
        raise typer.Exit(2)
    host = "127.0.0.1" if scp.host in ("0.0.0.0", "::") else scp.host
    # with scp.stow_tls: HTTPS, the receiver's certificate checked against its CAs (else the system's)
    scheme, verify = ("https", str(scp.stow_tls.ca_certificates or "") or True) if scp.stow_tls else ("http", True)
    headers = {}
    if token_file is not None:
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    login = None
    if user is not None:
        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else typer.prompt(
            f"password of {user}", hide_input=True)
        login = (user, password)
    try:
        answer = requests.post(f"{scheme}://{host}:{scp.stow_port}/pull", json={"study": study, "series": series},
                               timeout=3600, verify=verify, headers=headers, auth=login)
    except requests.RequestException as exc:
        console.print(f"[red]the receiver does not answer on port {scp.stow_port}: {exc}[/red]")
        raise typer.Exit(1) from None
    if answer.status_code != 200:
        hint = " (scp.stow_auth asks a login: pass --user or --token-file)" if answer.status_code == 401 else ""
        console.print(f"[red]pull refused ({answer.status_code}): {answer.text.strip()}{hint}[/red]")
        raise typer.Exit(1)
    result = answer.json()
    console.print(f"study {study}: {len(result['series'])} series, {result['stored']} instance(s) stored, "
                  f"{len(result['refused'])} refused")
    for item in result["refused"]:
        console.print(f"  refused {item['sop_instance_uid']} (0x{item['status']:04X}): {item['reason']}")
    if result["refused"]:
        raise typer.Exit(1)


@app.command()
def cleanup(
    config: ConfigOption = None,
    older_than: Annotated[str | None, typer.Option(
        help="idle time such as 7d, 24h, 90m (a bare number: days); default: storage.retention_days")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, with sizes")] = False,
    include_failed: Annotated[bool, typer.Option(
        "--include-failed", help="also remove series whose jobs failed or were withheld as implausible")] = False,
) -> None:
    """Remove finished series from the spool and delivered results from the outbox, once idle long enough,
    and the ledger's history events older than storage.history_days.

    Never removed: what is receiving, queued, running or undelivered; the ledger's series, jobs and
    deliveries; quarantine.
    """
    settings = _setup(config, runs_models=False)
    from .records import DataLayout
    from .retention import Retention, human_size, parse_age, recover_aside

    try:
        seconds = parse_age(older_than) if older_than else settings.storage.retention_days * 86400
    except ValueError as exc:
        console.print(f"[red]--older-than: {exc}[/red]")
        raise typer.Exit(2) from None
    layout = DataLayout(settings.data_dir)
    if not layout.spool.is_dir():
        console.print(f"[red]no spool in {layout.root}: is storage.data_dir right?[/red]")
        raise typer.Exit(2)
    ledger = _read_ledger(settings)
    if not dry_run:
        recover_aside(layout, ledger)
    retention = Retention(layout, ledger, include_failed)
    planned = retention.plan(seconds)
    done = [r for r in planned.removals if dry_run or retention.remove(r)]
    verb = "would remove" if dry_run else "removed"
    out = Console()
    for removal in done:
        out.print(f"{verb} {removal.kind} {removal.uid} ({human_size(removal.bytes)}, "
                  f"idle {removal.age_seconds / 86400:.1f} d)", highlight=False, soft_wrap=True)
    series = [r for r in done if r.kind == "series"]
    outboxes = [r for r in done if r.kind == "outbox"]
    summary = (f"{verb} {len(series)} series ({human_size(sum(r.bytes for r in series))}) and {len(outboxes)} "
               f"outbox folder(s) ({human_size(sum(r.bytes for r in outboxes))}) idle for "
               f"{seconds / 86400:g} d or more")
    days = settings.storage.history_days
    if dry_run:
        trimmed = f"history older than {days:g} d would be trimmed"
    else:
        trimmed = f"{ledger.trim_history(days * 86400)} history event(s) older than {days:g} d trimmed"
    kept = "; ".join(f"{count} {reason}" for reason, count in sorted(planned.kept.items()))
    logging.getLogger("pacsworker.cleanup").info("%s; %s%s", summary, trimmed, f"; kept: {kept}" if kept else "")
    out.print(f"{summary}\n{trimmed}" + (f"\nkept: {kept}" if kept else ""), highlight=False, soft_wrap=True)


rules_app = typer.Typer(no_args_is_help=True, help="Routing rules: which series go to which model.")
app.add_typer(rules_app, name="rules")


@rules_app.command("test")
def rules_test(
    paths: Annotated[list[Path], typer.Argument(help="folders or files of DICOM series")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """For every series found: the model(s) it would go to, and for each other model the first rule it fails."""
    settings = _setup(config, runs_models=False)
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
        try:
            series[uid].frames += int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):  # a malformed count: one image, as the receiver counts it
            series[uid].frames += 1
    report: list[dict[str, Any]] = []
    for record in series.values():
        reasons = {model.name: match_reason(record, model) for model in settings.models}
        report.append({
            "series_uid": record.series_uid, "description": record.series_description, "modality": record.modality,
            "instances": record.instances, "images": record.frames,
            "models": [name for name, reason in reasons.items() if not reason],
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
            f"{row['series_uid']}\n{row['description']}", row["modality"],
            str(row["instances"]) + (f" ({row['images']} images)" if row["images"] != row["instances"] else ""),
            ", ".join(row["models"]) or "skipped",
            "\n".join(f"{name}: {reason}" for name, reason in row["not"].items()),
        )
    Console().print(table)
    rules = Table(title="the rules applied (defaults filled in; images: frames of multi-frame instances count)")
    for column in ("model", "rule"):
        rules.add_column(column)
    for model in settings.models:
        rules.add_row(model.name, _rule_summary(model))
    Console().print(rules)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Receivers, series receiving, queue depth, running jobs and their stage, failures, pending and
    dead-lettered deliveries (read from the ledger and the broker)."""
    settings = _setup(config, runs_models=False)
    from .ledger.views import status_report
    from .metrics import queue_depths

    ledger = _read_ledger(settings)
    report = status_report(ledger, queue_depths(settings))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out = Console()
    table = Table(title=f"pacsworker status ({settings.data_dir})")
    table.add_column("what")
    table.add_column("count / detail")
    for name, receiver in report["receivers"].items():
        ports = ", ".join(f"{kind} {port}" for kind, port in receiver["ports"].items())
        state = receiver["state"] + (" (data_dir below its reserve: refusing)" if receiver["short_of_space"] else "")
        table.add_row(f"receiver {name}", f"{state}; {ports}; heartbeat {receiver['last_heartbeat_seconds_ago']} s ago")
    if not report["receivers"]:
        table.add_row("receiver", "never started on this ledger")
    for state, count in sorted(report["series"].items()):
        table.add_row(f"series {state}", str(count))
    for uid, detail in report["receiving"].items():
        table.add_row(f"receiving {uid}", f"{detail['instances']} instances so far from {detail['calling_aet'] or '?'} "
                      f"({detail['modality']})")
    for queue, depth in sorted(report["queue_depth"].items()):
        table.add_row(f"queue {queue}", f"{depth} waiting")
    for job_id, detail in report["running_jobs"].items():
        table.add_row(f"running {job_id}", f"{detail['model']}: {detail['stage'] or 'starting'} for "
                      f"{detail['running_seconds']:.0f} s on {detail['worker']} (attempt {detail['attempt']})")
    for state, count in sorted(report["jobs"].items()):
        table.add_row(f"jobs {state}", str(count))
    table.add_row("pending deliveries", str(len(report["pending_deliveries"])))
    table.add_row("dead-lettered deliveries", str(len(report["dead_letters"])))
    for uid, reason in report["skipped_series"].items():
        table.add_row(f"skipped {uid}", reason)
    for job_id, reason in report["failed_jobs"].items():
        if job_id not in report["dead_letters"]:
            table.add_row(f"failed {job_id}", reason)
    for job_id, reason in report["no_result_jobs"].items():
        table.add_row(f"no result {job_id}", reason)
    for job_id, result in report["results"].items():
        table.add_row(f"results {job_id}", f"{result['state']}: {result['summary'] or 'no values'}\n"
                      f"to {result['delivered_to'] or 'no destination yet'}")
    for job_id, destinations in report["pending_deliveries"].items():
        for name, error in destinations.items():
            table.add_row(f"delivering {job_id} to {name}", error or "not yet tried")
    for job_id, destinations in report["dead_letters"].items():
        for name, letter in destinations.items():
            kind = "permanent failure" if letter["permanent"] else "retries used up"
            table.add_row(f"[red]dead letter[/red] {job_id} to {name}",
                          f"{kind}: {letter['reason']}\n(pacsworker deliveries retry {job_id})")
    for job_id, reason in report["implausible_jobs"].items():
        table.add_row(f"withheld {job_id}", reason)
    for job_id, reason in report["flagged_jobs"].items():
        table.add_row(f"flagged {job_id}", reason)
    out.print(table)


def _read_ledger(settings: Settings):
    """The ledger, for a command that reads it; a ledger that cannot be opened ends the command with why."""
    from .ledger import LedgerError, open_ledger

    try:
        return open_ledger(settings, "cli")
    except LedgerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - a database that is down or refuses: say so, no traceback
        console.print(f"[red]the ledger ({_ledger_name(settings)}) could not be opened: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}[/red]")
        raise typer.Exit(2) from None


def _ledger_name(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    from .ledger import ledger_url

    return make_url(ledger_url(settings)).render_as_string(hide_password=True)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _events_table(title: str, events: list[dict]) -> Table:
    table = Table(title=title)
    for column in ("when", "event", "by", "series / job", "destination", "state", "count", "reason"):
        table.add_column(column, overflow="fold")
    for event in events:
        table.add_row(_when(event["at"]), event["kind"], event["actor"],
                      event["job_id"] or event["series_uid"] or event["study_uid"] or "", event["destination"] or "",
                      event["state"] or "", "" if event["count"] is None else str(event["count"]), event["reason"])
    return table


@app.command()
def history(
    config: ConfigOption = None,
    study: Annotated[str | None, typer.Option("--study", help="events of a study (Study Instance UID)")] = None,
    series: Annotated[str | None, typer.Option("--series", help="events of a series and its jobs")] = None,
    job: Annotated[str | None, typer.Option("--job", help="events of a job")] = None,
    since: Annotated[str | None, typer.Option("--since", help="only the last 2h, 30m, 7d, ...")] = None,
    limit: Annotated[int, typer.Option(help="at most this many events", min=1)] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Events from the ledger's history, newest first: received, completed, routed, queued, sent, started,
    finished, requeued, delivered, dead-lettered, retried (when, by whom, counts, reasons)."""
    settings = _setup(config, runs_models=False)
    from dataclasses import asdict

    from .retention import parse_age

    try:
        since_seconds = parse_age(since) if since else None
    except ValueError as exc:
        console.print(f"[red]--since: {exc}[/red]")
        raise typer.Exit(2) from None
    if not (study or series or job or since):
        console.print("[red]say whose history: --study UID, --series UID, --job ID or --since AGE[/red]")
        raise typer.Exit(2)
    ledger = _read_ledger(settings)
    events = [asdict(e) for e in ledger.history(study_uid=study, series_uid=series, job_id=job,
                                                 since_seconds=since_seconds, limit=limit)]
    if as_json:
        print(json.dumps(events, indent=2))
        return
    whose = ", ".join(f"{name} {value}" for name, value in (("study", study), ("series", series), ("job", job),
                                                             ("since", since)) if value)
    Console(width=max(Console().width, 160)).print(_events_table(f"history of {whose} ({len(events)} events, "
                                                                 "newest first)", events))


def _jobs_show(config: Path | None, job_id: str, as_json: bool) -> None:
    settings = _setup(config, runs_models=False)
    from .ledger.views import job_detail

    shown = job_detail(_read_ledger(settings), job_id)
    if shown is None:
        console.print(f"[red]no job {job_id} in the ledger[/red]")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    job = shown["job"]
    out = Console(width=max(Console().width, 160))
    table = Table(title=f"job {job_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for name in ("model", "state", "scope", "series_uid", "study_uid", "attempts", "worker", "stage"):
        table.add_row(name, str(job[name]))
    for name in ("queued_at", "sent_at", "started_at", "heartbeat", "finished_at"):
        table.add_row(name.replace("_at", ""), _when(job[name]))
    inputs = shown["inputs"]
    table.add_row("inputs", f"{inputs['count']} instance(s) of " + ", ".join(
        f"{uid} ({len(sops)})" for uid, sops in inputs["series"].items()) + " (--json lists their UIDs)")
    from .ledger.views import value_summary

    if job["values"]:
        table.add_row("values", value_summary(job["values"]))
    for role, uid in job["outputs"].items():
        table.add_row(f"output {role}", str(uid))
    for name in ("implausible", "notes"):
        if job[name]:
            table.add_row(name, "; ".join(job[name]))
    if job["reason"]:
        table.add_row("reason", job["reason"])
    if job["traceback"]:  # where the model's own code raised
        table.add_row("traceback", job["traceback"])
    for delivery in shown["deliveries"]:
        waiting = [f"{file}: {i['state']}{' (' + i['detail'] + ')' if i['detail'] else ''}"
                   for file, i in delivery["instances"].items() if i["state"] != "delivered"]
        table.add_row(f"to {delivery['destination']}", f"{delivery['state']} after {delivery['attempts']} attempt(s)"
                      + (f": {delivery['last_error']}" if delivery["last_error"] else "")
                      + (f"; not delivered: {', '.join(waiting)}" if waiting else ""))
    out.print(table)
    out.print(_events_table(f"events of {job_id}, newest first", shown["events"]))


deliveries_app = typer.Typer(no_args_is_help=True, help="Results in the outbox: send dead-lettered ones again.")
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("retry")
def deliveries_retry(
    job_ids: Annotated[list[str] | None, typer.Argument(help="the jobs whose results to send again")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead-lettered delivery")] = False,
    config: ConfigOption = None,
) -> None:
    """Send dead-lettered (or waiting) deliveries again now, with a fresh delivery.max_age_seconds.

    Only the destinations and instances not yet confirmed are sent. Exit 2: no such job; 1: nothing to retry.
    """
    settings = _setup(config, runs_models=False)
    from .ledger import open_ledger

    if bool(job_ids) == all_:
        console.print("[red]name job ids, or give --all[/red]")
        raise typer.Exit(2)
    ledger = open_ledger(settings, "cli")
    outbox = settings.data_dir / "outbox"
    if all_:
        job_ids = list(dict.fromkeys(d.job_id for d in ledger.dead_letters(limit=100_000)))
    job_ids = job_ids or []  # given (checked above), or every dead letter
    for jid in job_ids:
        if not ledger.deliveries_of(jid):
            console.print(f"[red]no results of job {jid} in {outbox}[/red]")
            raise typer.Exit(2)
    retried = {}
    operator = f"{os.environ.get('USER', '')}@cli".lstrip("@")
    for jid in job_ids:
        names, task_id = ledger.retry_delivery(jid, operator)
        if not names:
            console.print(f"job {jid}: every destination has its results already")
            continue
        retried[jid] = names, task_id
        logging.getLogger("pacsworker.delivery").info("job %s: delivery to %s retried by the operator",
                                                      jid, ", ".join(names))
    if not retried:
        console.print("nothing to retry")
        raise typer.Exit(1)
    from .tasks.app import configure
    from .tasks.jobs import deliver
    from .tasks.queues import DELIVERY_QUEUE

    configure(settings)
    for jid, (names, task_id) in retried.items():
        try:
            deliver.apply_async((jid,), queue=DELIVERY_QUEUE, task_id=task_id, retry=False)
            console.print(f"job {jid}: sending again to {', '.join(names)}")
        except Exception as exc:  # noqa: BLE001 - the receiver's recovery sweep sends it once the broker is back
            console.print(f"job {jid}: due again for {', '.join(names)}; the broker is unavailable "
                          f"({type(exc).__name__}), the recovery sweep will send it")


jobs_app = typer.Typer(no_args_is_help=True, help="Model jobs: run failed ones again.")
app.add_typer(jobs_app, name="jobs")

RETRYABLE_JOB_STATES = ("failed", "no-result", "implausible")


@jobs_app.command("retry")
def jobs_retry(
    job_ids: Annotated[list[str] | None, typer.Argument(help="the jobs to run again")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="every failed job")] = False,
    config: ConfigOption = None,
) -> None:
    """Run jobs again from the start (a fixed model, a freed GPU): failed, no-result or withheld ones.

    The job keeps its id; its new results supersede nothing, being its first. Exit 2: no such job
    or one that has not ended badly; 1: nothing to retry.
    """
    settings = _setup(config, runs_models=False)
    from .ledger import open_ledger
    from .tasks.app import configure
    from .tasks.submit import send_job

    if bool(job_ids) == failed:
        console.print("[red]name job ids, or give --failed[/red]")
        raise typer.Exit(2)
    ledger = open_ledger(settings, "cli")

    def results_waiting(job) -> bool:  # it ran; its delivery failed: deliveries retry resends, no re-run
        return bool(ledger.deliveries_of(job.job_id))

    if failed:
        jobs = []
        for job in ledger.jobs_in_state("failed", limit=100_000):
            if not results_waiting(job):
                jobs.append(job)
            else:
                console.print(f"job {job.job_id}: its results wait in the outbox, not run again "
                              f"(pacsworker deliveries retry {job.job_id})", soft_wrap=True)
    else:
        jobs = []
        for jid in job_ids or []:  # given: checked above
            found = ledger.job(jid)
            if found is None:
                console.print(f"[red]no job {jid} in {settings.data_dir}[/red]")
                raise typer.Exit(2)
            job = found
            if results_waiting(job):
                console.print(f"[red]job {jid} has results waiting in the outbox: pacsworker deliveries retry "
                              f"{jid} sends them again[/red]", soft_wrap=True)
                raise typer.Exit(2)
            if job.state not in RETRYABLE_JOB_STATES:
                console.print(f"[red]job {jid} is {job.state}; only {', '.join(RETRYABLE_JOB_STATES)} jobs run "
                              "again[/red]")
                raise typer.Exit(2)
            jobs.append(job)
    if not jobs:
        console.print("nothing to retry")
        raise typer.Exit(1)
    configure(settings)
    operator = f"{os.environ.get('USER', '')}@cli".lstrip("@")
    for job in jobs:
        previous = f"{job.state}: {job.reason}" if job.reason else job.state
        if not ledger.retry_job(job.job_id, operator):
            console.print(f"job {job.job_id}: changed meanwhile, not run again", soft_wrap=True)
            continue
        logging.getLogger("pacsworker.tasks").info("job %s retried by the operator (was %s)", job.job_id, previous)
        if send_job(settings, job.job_id, job.model, ledger):
            console.print(f"job {job.job_id}: queued again (was {previous})", soft_wrap=True)
        else:
            console.print(f"job {job.job_id}: queued again; the broker is unavailable, the recovery sweep will send it",
                          soft_wrap=True)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="the job's id (status, history and the page show it)")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable, with the inputs' SOP Instance UIDs")] = False,
) -> None:
    """One job from the ledger: its state and times, the instances it was made for, its values and
    outputs, each destination's delivery, and its events (newest first)."""
    _jobs_show(config, job_id, as_json)


users_app = typer.Typer(no_args_is_help=True, help="Users files of basic login (scp.stow_auth, metrics.auth).")
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    users_file: Annotated[Path, typer.Argument(help="the users file (created with mode 0600 when missing)")],
    user: Annotated[str, typer.Argument(help="the user name (no spaces, no colons)")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="read the password from the first line of stdin instead of a prompt")] = False,
) -> None:
    """Add a user to a users file, or set a new password for one; the password is asked for (twice), or
    read from stdin, never taken from the command line. A running receiver reads the file again."""
    from .http_auth import add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password of {user}", hide_input=True, confirmation_prompt=True)
    try:
        new = add_user(users_file, user, password)
    except (ValueError, OSError) as exc:
        console.print(f"[red]{users_file}: {getattr(exc, 'strerror', None) or exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"user {user} {'added to' if new else 'has a new password in'} {users_file}")
