"""Series completion from evidence, not only the quiet timer; and completion on request."""

from __future__ import annotations

import subprocess
import sys
import time

import pydicom
import pytest
from conftest import free_port, storescu, wait_until, write_config

from pacsworker.config import Settings
from pacsworker.records import DataLayout, SeriesRecord, SeriesState, read_json
from pacsworker.scp.server import Receiver

MR06 = "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"
CT06 = "ct06_ge_lightspeed_liver_3slice"
QUIET = 60.0  # far longer than any test waits: only evidence or a request can complete a series


@pytest.fixture
def receiver(tmp_path):
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": QUIET, "allowed_calling_aets": []},
        storage={"data_dir": str(tmp_path / "data")},
    )
    completed: list[SeriesRecord] = []
    rx = Receiver(settings, completed.append)
    rx.completed = completed
    rx.start()
    yield rx
    rx.stop()


def _record(receiver, series_uid: str) -> SeriesRecord:
    return read_json(receiver.layout.series_record(series_uid), SeriesRecord)


def _copies(dicom_dir, folder, tmp_path, images_in_acquisition: int | None, keep: int | None = None):
    """ct06's instances with Images in Acquisition set (as many scanners send it)."""
    target = tmp_path / f"ct06-{images_in_acquisition}-{keep}"
    target.mkdir()
    for path in sorted((dicom_dir / folder).glob("*.dcm"))[:keep]:
        ds = pydicom.dcmread(path)
        ds.ImagesInAcquisition = images_in_acquisition
        ds.save_as(target / path.name)
    return target


def test_one_multi_frame_instance_completes_its_series_at_once(receiver, dicom_dir):
    started = time.monotonic()
    assert storescu(receiver.settings.scp.port, dicom_dir / MR06).returncode == 0
    wait_until(lambda: receiver.completed, 15, what="the enhanced MR series")
    assert time.monotonic() - started < QUIET / 4
    [record] = receiver.completed
    assert record.instances == 1 and record.completed_by == "one multi-frame instance holds the volume"
    assert _record(receiver, record.series_uid).completed_by == record.completed_by


def test_images_in_acquisition_completes_when_every_image_arrived(receiver, dicom_dir, tmp_path):
    whole = _copies(dicom_dir, CT06, tmp_path, 3)
    assert storescu(receiver.settings.scp.port, whole).returncode == 0
    wait_until(lambda: receiver.completed, 15, what="the series whose 3 of 3 images arrived")
    assert receiver.completed[0].completed_by == "all 3 Images in Acquisition arrived"
    # two of four announced images: the series waits for the rest (or its quiet time)
    receiver.completed.clear()
    partial = _copies(dicom_dir, CT06, tmp_path, 4, keep=2)
    series_uid = str(pydicom.dcmread(next(partial.glob("*.dcm"))).SeriesInstanceUID)
    # same series UID as before: it re-opens, so give it a distinct one
    for path in partial.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid + ".9"
        ds.save_as(path)
    assert storescu(receiver.settings.scp.port, partial).returncode == 0
    time.sleep(4)
    assert receiver.completed == []
    assert _record(receiver, series_uid + ".9").state == SeriesState.RECEIVING


def test_series_complete_command_completes_a_series_now(receiver, dicom_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", storage={"data_dir": str(receiver.layout.root)})
    files = sorted((dicom_dir / CT06).glob("*.dcm"))
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert storescu(receiver.settings.scp.port, dicom_dir / CT06).returncode == 0
    wait_until(lambda: _record(receiver, series_uid), 10, what="the series record")
    time.sleep(2)
    assert receiver.completed == [], "without evidence the quiet time applies"

    def cli(*args) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "pacsworker", "series", "complete", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        done.stdout = " ".join((done.stdout + done.stderr).split())  # what the user reads, unwrapped
        return done

    asked = cli(series_uid)
    assert asked.returncode == 0 and "(3 instances so far) will be completed by the receiver" in asked.stdout
    wait_until(lambda: receiver.completed, 10, what="the series completed on request")
    assert receiver.completed[0].completed_by == "completed on request" and receiver.completed[0].instances == 3
    assert not DataLayout(receiver.layout.root).completion_request(series_uid).exists()
    record = _record(receiver, series_uid)
    record.state = SeriesState.QUEUED  # as routing leaves it (this receiver's callback only collects)
    receiver.layout.series_record(series_uid).write_text(record.model_dump_json())
    again = cli(series_uid)
    assert again.returncode == 1 and "is not being received: it is queued" in again.stdout
    assert cli("1.2.3.999").returncode == 2
    bad = cli("../../etc")
    assert bad.returncode == 2 and "not a valid Series Instance UID" in bad.stdout
