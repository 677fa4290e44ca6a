"""Starting the daemons as documented: in any order, on a data_dir that may not exist yet."""

from __future__ import annotations

import time

from conftest import Pacsworker, free_port, port_open, wait_until, write_config


def test_scp_and_worker_started_together_on_a_new_data_dir(tmp_path):
    port = free_port()
    data_dir = tmp_path / "not" / "yet" / "data"
    config = write_config(
        tmp_path / "config.yaml",
        scp={"host": "127.0.0.1", "port": port}, storage={"data_dir": str(data_dir)},
    )
    receiver = Pacsworker(["scp"], config, tmp_path / "scp.log")
    worker = Pacsworker(["worker"], config, tmp_path / "worker.log")  # the same moment
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        wait_until(lambda: "ready" in worker.output() or worker.proc.poll() is not None, 90, what="the worker")
        assert worker.proc.poll() is None, worker.output()[-2000:]
        assert "cannot use data_dir" not in worker.output()
        assert (data_dir / "broker" / "control").is_dir() and not (tmp_path / "control").exists()
    finally:
        worker.stop()
        receiver.stop()


def test_worker_waits_for_a_data_dir_then_says_why_it_cannot_use_it(tmp_path):
    blocker = tmp_path / "mount"
    blocker.write_text("a file where the mount point's folder should be")
    config = write_config(
        tmp_path / "config.yaml",
        storage={"data_dir": str(blocker / "data"), "wait_for_data_dir_seconds": 2},
    )
    started = time.monotonic()
    worker = Pacsworker(["worker"], config, tmp_path / "worker.log")
    assert worker.proc.wait(timeout=60) == 2
    output = " ".join(worker.output().split())  # the console wraps long lines
    assert f"waiting up to 2 s for data_dir {blocker / 'data'}" in output
    assert f"cannot use data_dir {blocker / 'data'}: it does not exist and cannot be created yet" in output
    assert time.monotonic() - started >= 2


def test_worker_refuses_a_data_dir_that_is_a_file_at_once(tmp_path):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    config = write_config(tmp_path / "config.yaml", storage={"data_dir": str(not_a_folder)})
    worker = Pacsworker(["worker"], config, tmp_path / "worker.log")
    assert worker.proc.wait(timeout=60) == 2
    output = " ".join(worker.output().split())  # the console wraps long lines
    assert "it exists and is not a folder" in output and "waiting" not in output
