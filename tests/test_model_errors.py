"""A model that raises: its job fails with the reason and where the model raised it; the traceback
from the model's own file is in the job (the ledger, `jobs show`), in the log at ERROR, and printed by ``run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import (
    Pacsworker,
    free_port,
    ledger_of,
    pacsworker_run,
    port_open,
    status_json,
    storescu,
    wait_until,
    write_config,
)

MODELS = Path(__file__).parent / "models"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
SWITCHABLE = MODELS / "switchable.py"
BONE = ["SCT", "3138006", "Bone tissue"]
RAISE_LINE = next(n for n, line in enumerate(SWITCHABLE.read_text().splitlines(), 1) if "raise RuntimeError" in line)


def _raising_config(tmp_path: Path, **sections) -> Path:
    flag = tmp_path / "fail"
    flag.write_text("")  # while it exists, the model raises
    return write_config(
        tmp_path / "c.yaml", storage={"data_dir": str(tmp_path / "data")},
        models=[{"name": "raises", "kind": "python", "source": f"{SWITCHABLE}:Switchable",
                 "options": {"fail_while": str(flag)},
                 "outputs": {"bone": {"kind": "labelmap",
                                      "segments": [{"label": 1, "name": "Bone", "category": BONE, "type": BONE}]}}}],
        **sections,
    )


def test_a_model_that_raises_fails_its_job_with_the_traceback_kept_and_logged(tmp_path, dicom_dir):
    port = free_port()
    config = _raising_config(tmp_path, scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1})
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02).returncode == 0
        wait_until(lambda: status_json(config)["jobs"].get("failed") == 1, 120, what="the job to fail")
        wait_until(lambda: "failed:" in serve.output(), 30, what="the job's failure to be logged")
    finally:
        serve.stop()
    [(job_id, reason)] = status_json(config)["failed_jobs"].items()
    assert reason == f"RuntimeError in model raises (switchable.py, line {RAISE_LINE}): CUDA out of memory (simulated)"
    trace = ledger_of(tmp_path / "data").job(job_id).traceback
    assert trace.startswith("Traceback (most recent call last):")
    assert f'File "{SWITCHABLE}", line {RAISE_LINE}, in predict' in trace
    assert "runtime.py" not in trace, "pacsworker's frames that only called the model are left out"
    assert trace.endswith("RuntimeError: CUDA out of memory (simulated)")
    shown = subprocess.run([sys.executable, "-m", "pacsworker", "jobs", "show", job_id, "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=True, env={**os.environ, "COLUMNS": "400"})
    assert "traceback" in shown.stdout and f"line {RAISE_LINE}, in predict" in shown.stdout  # what the operator reads
    output = serve.output()
    [logged] = [line for line in output.splitlines() if f"job {job_id} failed:" in line]
    assert " ERROR " in logged
    assert f'File "{SWITCHABLE}", line {RAISE_LINE}, in predict' in output.partition(logged)[2]
    assert "raises raised" not in output and "succeeded" not in output


def test_run_prints_where_the_model_raised(tmp_path, dicom_dir):
    result = pacsworker_run(dicom_dir / CT02, tmp_path / "out", _raising_config(tmp_path), "raises")
    assert result.returncode == 4
    assert f"RuntimeError in model raises (switchable.py, line {RAISE_LINE}): CUDA out of memory" in " ".join(
        result.stderr.split())
    assert f'File "{SWITCHABLE}", line {RAISE_LINE}, in predict' in result.stderr
