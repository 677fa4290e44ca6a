"""The tutorials' shell blocks run as a newcomer would run them, in a scratch folder, in order.

A block's info string says how: ```` ```sh ```` runs and must succeed; ```` ```sh background ````
is started and left running (a second terminal's ``serve``), stopped with SIGTERM at the end;
```` ```sh needs-network ```` (a download, a PACS, a second host), ``needs-gpu`` and ``needs-docker``
blocks are only parsed (``bash -n``). The tutorials' fixed ports (11112, 9100) become free ones, and
``SERIES`` names a CT series of the test data (the ports the defaults use move with them, by the
settings' environment variables). What the reader is told to expect is then checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import DICOM_DIR, REPO, docs_images, free_port

TUTORIALS = REPO / "docs" / "tutorials"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = {"sh", "bash"}
PARSE_ONLY = {"needs-network", "needs-gpu", "needs-docker"}
CT_SERIES = DICOM_DIR / "ct02_philips_ingenuity_headphantom_5mm"


def blocks(page: Path) -> list[tuple[set[str], str]]:
    """The page's shell blocks and the blocks it says to save (``file=path``), with their marks, in order."""
    found = []
    for language, marks, body in FENCE.findall(page.read_text()):
        if language in SHELL or "file=" in marks:
            found.append((set(marks.split()), body))
    return found


def script_of(page: Path, ports: dict[str, int]) -> tuple[str, list[str]]:
    """The page's runnable blocks as one bash script, and the blocks that are only parsed."""
    lines = ["set -euo pipefail", "set -m", "pids=()",  # -m: each background block in a process group of its own
             'trap \'for p in "${pids[@]}"; do kill -TERM -- -"$p" 2>/dev/null || true; done; wait\' EXIT']
    parsed = []
    for marks, body in blocks(page):
        saved = [m.removeprefix("file=") for m in marks if m.startswith("file=")]
        unknown = marks - PARSE_ONLY - {"background"} - {f"file={name}" for name in saved}
        assert not unknown, f"{page.name}: unknown block marks {unknown}"
        if saved:  # the reader saves this block as that file
            lines.append(f"mkdir -p \"$(dirname {saved[0]})\" && cat > {saved[0]} <<'END_OF_BLOCK'\n{body}END_OF_BLOCK")
            continue
        for fixed, free in ports.items():
            body = re.sub(rf"\b{fixed}\b", str(free), body)
        if marks & PARSE_ONLY:
            parsed.append(body)
        elif "background" in marks:
            lines.append(f"bash -c {_quote(body)} > background-{len(lines)}.log 2>&1 & pids+=($!)")
        else:
            lines.append(body)
    return "\n".join(lines) + "\n", parsed


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def run_tutorial(name: str, scratch: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    if not CT_SERIES.is_dir():
        pytest.skip(f"{CT_SERIES} is missing (set PACSWORKER_TEST_DICOM)")
    page = TUTORIALS / name
    dimse, ops = free_port(), free_port()
    script, parsed = script_of(page, {"11112": dimse, "9100": ops})
    for body in parsed:
        checked = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert checked.returncode == 0, f"{name}: a block does not parse:\n{body}\n{checked.stderr}"
    (scratch / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSWORKER")}
    env |= {"SERIES": str(CT_SERIES), "PATH": f"{REPO / '.venv' / 'bin'}:{env['PATH']}",
            # the defaults' ports, moved with the ones the blocks name
            "PACSWORKER__SCP__PORT": str(dimse), "PACSWORKER__METRICS__PORT": str(ops)}
    done = subprocess.run(["bash", "-c", script], cwd=scratch, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(scratch.glob("background-*.log")))
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{logs}"
    return done


def test_every_tutorial_block_is_marked_as_run_or_parsed():
    pages = sorted(TUTORIALS.glob("*.md"))
    assert {p.name for p in pages} >= {"first-result.md", "first-model.md"}
    for page in pages:
        for marks, _ in blocks(page):
            marks = {m for m in marks if not m.startswith("file=")}
            assert marks <= PARSE_ONLY | {"background"}, f"{page.name}: unknown block marks {marks}"


def test_first_result_tutorial(tmp_path):
    done = run_tutorial("first-result.md", tmp_path)
    assert "PACSWORKER" in done.stdout  # status names the receiver
    found = sorted((tmp_path / "data" / "results").rglob("*.dcm"))
    modalities = {pydicom.dcmread(p, stop_before_pixels=True).Modality for p in found}
    assert {"SEG", "SR"} <= modalities, found
    source = pydicom.dcmread(next(CT_SERIES.iterdir()), stop_before_pixels=True)
    assert all(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == source.StudyInstanceUID for p in found)
    assert all(str(p.relative_to(tmp_path)) in done.stdout for p in found)  # step 4's find listed them


def test_a_tutorial_that_fails_fails_its_test(tmp_path):
    """The runner itself: a block that fails stops the script and the test says which tutorial."""
    page = tmp_path / "broken.md"
    page.write_text("```sh\ntrue\n```\n\n```sh\nfalse\n```\n\n```sh\ntouch never\n```\n")
    script, _ = script_of(page, {})
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not (tmp_path / "never").exists()


def test_background_blocks_are_stopped_at_the_end(tmp_path):
    page = tmp_path / "background.md"
    page.write_text("```sh background\nsleep 600\n```\n\n```sh\necho started\n```\n")
    script, _ = script_of(page, {})
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "started\n"
    leftovers = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True).stdout.split()
    assert not leftovers


def test_first_model_tutorial(tmp_path):
    run_tutorial("first-model.md", tmp_path)
    out = tmp_path / "out"
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["Dense tissue"]
    source = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in CT_SERIES.iterdir()}
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= source and referenced
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "bright" and "bright 0.1" in seg.SoftwareVersions
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["segments"]["Dense tissue"]["voxels"] > 0
    for path in docs_images("overlay.png"):  # the page of `pacsworker run` shows it
        shutil.copyfile(out / "overlay.png", path)
