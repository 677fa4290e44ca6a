"""A job that failed runs again on the operator's word, and its series ends where the re-run ends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Pacsworker, free_port, port_open, status_json, storescu, wait_until, write_config

MODELS = Path(__file__).parent / "models"
CT02 = "ct02_philips_ingenuity_headphantom_5mm"
CT02_SERIES = "1.3.46.670589.33.1.6002432791750815306.26862469513794233732"
CODE = ["SCT", "272673000", "Bone"]


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pacsworker", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    done.stdout = " ".join((done.stdout + done.stderr).split())
    return done


def test_jobs_retry_runs_a_failed_job_again(tmp_path, dicom_dir):
    flag = tmp_path / "gpu-missing"
    flag.touch()
    port = free_port()
    model = {"name": "bones", "kind": "python", "source": f"{MODELS / 'switchable.py'}:Switchable",
             "options": {"fail_while": str(flag)},
             "outputs": {"bone": {"kind": "labelmap", "segments": [{"label": 1, "name": "Bone", "category": CODE,
                                                                     "type": CODE}]}}}
    config = write_config(
        tmp_path / "c.yaml", scp={"port": port, "host": "127.0.0.1", "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp_path / "data")}, models=[model],
        destinations=[{"kind": "folder", "name": "results", "path": str(tmp_path / "results")}],
    )
    (tmp_path / "results").mkdir()
    serve = Pacsworker(["serve"], config, tmp_path / "serve.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, dicom_dir / CT02).returncode == 0
        state = wait_until(lambda: (s := status_json(config))["jobs"] == {"failed": 1} and s, 120, what="the failed job")
        [(job_id, reason)] = state["failed_jobs"].items()
        assert "CUDA out of memory (simulated)" in reason
        assert state["series"] == {"failed": 1}

        assert _cli(config, "jobs", "retry", "no-such-job").returncode == 2
        assert _cli(config, "jobs", "retry").returncode == 2  # neither ids nor --failed
        flag.unlink()  # the operator fixed the cause
        retried = _cli(config, "jobs", "retry", "--failed")
        assert retried.returncode == 0 and f"job {job_id}: queued again (was failed: " in retried.stdout
        wait_until(lambda: status_json(config)["jobs"] == {"done": 1}, 120, what="the job to run again and deliver")
        assert status_json(config)["series"] == {"done": 1}
        assert len(list((tmp_path / "results").rglob("*.dcm"))) == 3  # SEG, measurement SR, lengths SR
        assert _cli(config, "jobs", "retry", job_id).returncode == 2  # a done job does not run again
        assert _cli(config, "jobs", "retry", "--failed").returncode == 1  # nothing left to retry
    finally:
        serve.stop()
