#!/usr/bin/env python3
"""Fresh-install smoke: what a new user and the Docker image get, checked before the suite runs.

1. readme: copies the working tree (tracked and untracked, not ignored) into a scratch folder, runs
   the setup half of the README's first command there (no test extras), starts ``pacsworker serve``
   from that venv on free loopback ports, replays a CT series into it, waits for a SEG and an SR in
   ``data/results/``, then stops it with SIGTERM: exit status 0 and no process of its session left.
2. image: replays the Dockerfile's COPY and ``pip install`` steps into a scratch venv (build
   argument TORCH_SPEC set to this machine's torch, as a GPU host would set its own) and imports
   every module of the installed package.

The suite's own venv carries test extras that pull in modules the package may forget to declare
(as flower once hid prometheus_client); these venvs have only what a user or the image gets.
Standard library only; run it with the Python that setup.sh uses. Exit status 1 names the failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DICOM_DIR = Path(os.environ.get("PACSWORKER_TEST_DICOM", REPO.parent / "shared" / "dicom"))
CT_SERIES = "ct02_philips_ingenuity_headphantom_5mm"  # 28 axial CT slices: ct-body's default rule takes it
SERVE = ".venv/bin/pacsworker serve"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # the local CPU wheel; never an unpinned torch
RESULT_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60


class CheckFailed(Exception):
    """A step of the smoke failed; the message says which and why."""


def say(message: str) -> None:
    print(f"[fresh-install] {message}", flush=True)


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, what: str = "") -> None:
    say(f"$ {shlex.join(command)}   (in {cwd})")
    start = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise CheckFailed(f"{what or command[0]} exited with {result.returncode}:\n{tail(result.stdout, 60)}")
    say(f"  ok in {time.monotonic() - start:.0f} s")


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def clean_env() -> dict[str, str]:
    """This environment without what would steer a fresh install or the daemon away from its defaults."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PACSWORKER") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def copy_working_tree(dest: Path) -> None:
    """The files a clone of this working tree would have (uncommitted edits included, ignored files not)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def session_processes(sid: int) -> list[str]:
    """``pid command`` of every live process in session ``sid`` (serve is started as a session leader)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{stat.parent.name} {cmdline.strip()}")
        except (OSError, ValueError):
            pass
    return found


# ------------------------------------------------------------------------------------------------
# 1. the README's first command


def readme_setup_command(readme: str) -> str:
    """The setup half of the README's first command (the part before it starts the daemon)."""
    match = re.search(r"^## Run it.*?```bash\n(.*?)\n```", readme, re.MULTILINE | re.DOTALL)
    if not match:
        raise CheckFailed("README.md has no ```bash block under '## Run it'; this check follows that command")
    command = match.group(1).strip()
    setup, sep, rest = command.partition(" && ")
    if not sep or rest.strip() != SERVE:
        raise CheckFailed(f"README's first command is {command!r}, not 'SETUP && {SERVE}'; update this check with it")
    return setup


def check_readme(scratch: Path) -> None:
    tree = scratch / "checkout"
    tree.mkdir()
    say(f"1. the README's first command, on a copy of the working tree in {tree}")
    copy_working_tree(tree)
    setup = readme_setup_command((tree / "README.md").read_text())
    env = clean_env() | {"TORCH_SPEC": TORCH_SPEC}
    run(["bash", "-c", setup], cwd=tree, env=env, what=f"the README's setup ({setup})")

    dimse, ops = free_port(), free_port()
    config = tree / "fresh-install.yaml"  # loopback ports only; broker, models and data dir stay the defaults
    config.write_text(json.dumps({"scp": {"host": "127.0.0.1", "port": dimse},
                                  "metrics": {"host": "127.0.0.1", "port": ops}}))
    log_path = scratch / "serve.log"
    command = [str(tree / ".venv/bin/pacsworker"), "serve", "--config", str(config)]
    say(f"$ {shlex.join(command)}   (log: {log_path})")
    with open(log_path, "w") as log:
        serve = subprocess.Popen(command, cwd=tree, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        watch_serve(serve, tree, dimse, ops, log_path)
    except BaseException:
        try:
            stop_serve(serve, log_path)
        except CheckFailed as also:
            say(f"  (while stopping after the failure: {also})")
        raise
    stop_serve(serve, log_path)


def serve_log(log_path: Path) -> str:
    return f"--- serve log (last lines) ---\n{tail(log_path.read_text(errors='replace'))}"


def watch_serve(serve: subprocess.Popen, tree: Path, dimse: int, ops: int, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while not port_open(dimse):
        if serve.poll() is not None:
            raise CheckFailed(f"pacsworker serve exited with {serve.returncode} before it listened\n{serve_log(log_path)}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"pacsworker serve did not listen on port {dimse} within 120 s\n{serve_log(log_path)}")
        time.sleep(0.5)
    say(f"  serve listens on 127.0.0.1:{dimse} (pid {serve.pid})")

    series = DICOM_DIR / CT_SERIES
    if not series.is_dir():
        raise CheckFailed(f"{series} is missing (set PACSWORKER_TEST_DICOM to the test DICOM folder)")
    run([str(tree / ".venv/bin/pacsworker"), "replay", str(series), "--host", "127.0.0.1", "--port", str(dimse),
         "--aec", "PACSWORKER"], cwd=tree, env=clean_env(), what="pacsworker replay")

    results = tree / "data" / "results"
    say(f"  waiting (at most {RESULT_TIMEOUT_S} s) for a SEG and an SR in {results}")
    start = time.monotonic()
    modalities: dict[str, str] = {}
    while True:
        if serve.poll() is not None:
            raise CheckFailed(f"pacsworker serve exited with {serve.returncode} while processing\n{serve_log(log_path)}")
        modalities = result_modalities(tree, results)
        if {"SEG", "SR"} <= set(modalities.values()):
            break
        if failed := failed_jobs(tree):
            raise CheckFailed(f"the job failed: {failed}\n{serve_log(log_path)}")
        if time.monotonic() - start > RESULT_TIMEOUT_S:
            raise CheckFailed(f"no SEG and SR in {results} after {RESULT_TIMEOUT_S} s (found {modalities or 'nothing'})"
                              f"\n{status_text(tree)}\n{serve_log(log_path)}")
        time.sleep(3)
    say(f"  results after {time.monotonic() - start:.0f} s: " +
        ", ".join(f"{Path(p).parent.name[-12:]}/{Path(p).name[-16:]} {m}" for p, m in sorted(modalities.items())))

    with socket.create_connection(("127.0.0.1", ops), timeout=10) as s:  # prometheus_client serves this port
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        body = b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
    if " 200 " not in body.split("\r\n", 1)[0] or "pacsworker_instances_received" not in body:
        raise CheckFailed(f"GET /metrics on 127.0.0.1:{ops} did not answer with pacsworker's metrics:\n{body[:500]}")
    say(f"  /metrics on 127.0.0.1:{ops} answers")


def result_modalities(tree: Path, results: Path) -> dict[str, str]:
    """path -> Modality of each .dcm under ``results`` (read with the fresh venv's pydicom)."""
    files = sorted(str(p) for p in results.rglob("*.dcm")) if results.is_dir() else []
    if not files:
        return {}
    script = ("import json, sys, pydicom\n"
              "print(json.dumps({p: str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in sys.argv[1:]}))")
    out = subprocess.run([str(tree / ".venv/bin/python"), "-c", script, *files], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def failed_jobs(tree: Path) -> dict:
    """What ``pacsworker status --json`` reports as failed or skipped (nothing of the sort is expected)."""
    out = subprocess.run([str(tree / ".venv/bin/pacsworker"), "status", "--json", "--config",
                          str(tree / "fresh-install.yaml")], cwd=tree, env=clean_env(), capture_output=True, text=True)
    if out.returncode != 0:
        return {"pacsworker status": tail(out.stdout + out.stderr)}
    status = json.loads(out.stdout)
    return {**status.get("failed_jobs", {}), **status.get("skipped_series", {})}


def status_text(tree: Path) -> str:
    out = subprocess.run([str(tree / ".venv/bin/pacsworker"), "status", "--config", str(tree / "fresh-install.yaml")],
                         cwd=tree, env=clean_env(), capture_output=True, text=True)
    return f"--- pacsworker status ---\n{tail(out.stdout + out.stderr)}"


def stop_serve(serve: subprocess.Popen, log_path: Path) -> None:
    """SIGTERM; it must exit 0 and leave no process of its session behind (those are killed after the check)."""
    problems = []
    if serve.poll() is None:
        say(f"  stopping serve (SIGTERM to {serve.pid})")
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
            problems.append(f"pacsworker serve did not exit within {STOP_TIMEOUT_S} s of SIGTERM")
    if serve.returncode not in (0, -signal.SIGKILL):
        problems.append(f"pacsworker serve exited with {serve.returncode} on SIGTERM, not 0")
    deadline = time.monotonic() + 10
    while (left := session_processes(serve.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for line in left:
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        problems.append("processes of pacsworker serve outlived it (killed now):\n" + "\n".join(left))
    if problems:
        raise CheckFailed("\n".join(problems) + f"\n{serve_log(log_path)}")
    say("  serve exited with 0 and left no process behind")


# ------------------------------------------------------------------------------------------------
# 2. the Docker image's dependency set


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, value) in order; comments dropped, backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    found = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, value = line.strip().partition(" ")
            found.append((instruction.upper(), " ".join(value.split())))
    return found


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), value)


def shell_commands(run_value: str) -> list[list[str]]:
    """A RUN line's commands (split on && and ;), each as shell words."""
    return [shlex.split(part) for part in re.split(r"&&|;", run_value) if part.strip()]


def image_steps(dockerfile: str, build_args: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """What building the image does, in order: ``(kind, workdir, words)`` with kind ``copy`` (COPY's
    words), ``pip`` (the arguments of a ``pip install`` of a RUN line, build arguments expanded) or
    ``other`` (any other command of a RUN line)."""
    args: dict[str, str] = {}
    workdir = "/"
    steps = []
    for instruction, value in dockerfile_instructions(dockerfile):
        if instruction == "ARG":
            name, _, default = value.partition("=")
            args[name] = build_args.get(name, default.strip('"'))
        elif instruction == "WORKDIR":
            workdir = str(Path(workdir, expand(value, args)))
        elif instruction == "COPY":
            steps.append(("copy", workdir, value.split()))
        elif instruction == "RUN":
            for words in shell_commands(expand(value, args)):
                pip = words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]
                steps.append(("pip", workdir, words[words.index("install") + 1:]) if pip else ("other", workdir, words))
    return steps


def pip_installs(dockerfile: str, build_args: dict[str, str]) -> list[list[str]]:
    """The arguments of every ``pip install`` the image's build runs."""
    return [words for kind, _, words in image_steps(dockerfile, build_args) if kind == "pip"]


def check_image(scratch: Path) -> None:
    venv, root = scratch / "image-venv", scratch / "image-root"  # root stands for the image's /
    say(f"2. the Docker image's COPY and pip install steps, replayed into {venv} (TORCH_SPEC={TORCH_SPEC})")
    tree = scratch / "image-tree"
    tree.mkdir()
    copy_working_tree(tree)
    run([os.environ.get("PYTHON", "python3.11"), "-m", "venv", str(venv)], cwd=scratch)
    for kind, workdir, words in image_steps((tree / "Dockerfile").read_text(), {"TORCH_SPEC": TORCH_SPEC}):
        where = root / workdir.lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        if kind == "copy":
            copy_into_image(tree, where, words)
        elif kind == "pip":
            # the pip cache stays on (the image drops it to stay small; here it saves minutes)
            pip_args = [w for w in words if w != "--no-cache-dir"]
            run([str(venv / "bin/pip"), "install", "-q", *pip_args], cwd=where, env=clean_env(),
                what="the image's pip install " + shlex.join(pip_args))
        else:
            say(f"  (not replayed: {shlex.join(words)})")
    import_every_module(venv, tree / "src" / "pacsworker", scratch)


def copy_into_image(tree: Path, workdir: Path, words: list[str]) -> None:
    """COPY's meaning for plain sources: a folder's contents go into the target, files into a folder target."""
    if any(w.startswith("--") for w in words):
        raise CheckFailed(f"COPY {' '.join(words)}: options are not replayed by this check; extend it")
    *sources, target = words
    dest = workdir / target
    for name in sources:
        source = tree / name
        if not source.exists():
            raise CheckFailed(f"the Dockerfile copies {name}, which a checkout does not have")
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        elif len(sources) > 1 or target.endswith("/"):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / source.name)
        else:
            shutil.copy2(source, dest)


IMPORT_ALL = """
import importlib, json, pathlib, sys, traceback
import pacsworker
root = pathlib.Path(pacsworker.__file__).parent
names = sorted(".".join(("pacsworker",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py"))
failed = {}
for name in names:
    if name == "pacsworker.__main__":  # importing it runs the CLI
        continue
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps({"file": pacsworker.__file__, "modules": names, "failed": failed}))
"""


def import_every_module(venv: Path, source_package: Path, scratch: Path) -> None:
    """Every module of the installed (not editable) package imports, and none of the source tree is missing."""
    say("  importing every module of the installed package")
    out = subprocess.run([str(venv / "bin/python"), "-c", IMPORT_ALL], cwd=scratch, env=clean_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckFailed(f"the import walk itself failed:\n{tail(out.stdout + out.stderr)}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if not report["file"].startswith(str(venv)):
        raise CheckFailed(f"pacsworker was imported from {report['file']}, not from the image venv")
    source = {".".join(("pacsworker",) + p.relative_to(source_package).with_suffix("").parts).removesuffix(".__init__")
              for p in source_package.rglob("*.py")}
    missing = sorted(source - set(report["modules"]))
    if missing:
        raise CheckFailed(f"the installed package lacks modules of the source tree: {', '.join(missing)}")
    if report["failed"]:
        raise CheckFailed("modules that do not import with the image's dependencies:\n" +
                          "\n".join(f"{name}:\n{trace}" for name, trace in report["failed"].items()))
    say(f"  all {len(report['modules'])} modules import")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("readme", "image"), help="run one of the two checks")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    options = parser.parse_args()
    def interrupted(signum, _frame):  # so that the finally blocks stop the daemon this started
        raise CheckFailed(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    scratch = Path(tempfile.mkdtemp(prefix="pacsworker-fresh-install-"))
    start = time.monotonic()
    try:
        if options.only in (None, "readme"):
            check_readme(scratch)
        if options.only in (None, "image"):
            check_image(scratch)
    except CheckFailed as failure:
        print(f"[fresh-install] FAILED: {failure}", file=sys.stderr, flush=True)
        say(f"scratch folder kept for inspection: {scratch}")
        return 1
    say(f"passed in {time.monotonic() - start:.0f} s")
    if options.keep:
        say(f"scratch folder kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
