"""Series completion from evidence, not only the quiet timer; and completion on request."""

from __future__ import annotations

import subprocess
import sys
import time

import pydicom
import pytest
from conftest import Pacsworker, free_port, ledger_of, port_open, storescu, wait_until, write_config
from pydicom.uid import generate_uid

from pacsworker.config import Settings
from pacsworker.records import DataLayout, SeriesRecord, SeriesState
from pacsworker.scp.server import Receiver
from pacsworker.scp.spool import series_files

MR06 = "mr06_siemens_prisma_xa30_t1_enhanced_multiframe"
CT06 = "ct06_ge_lightspeed_liver_3slice"
CT08_MISSING_SLICE = "ct08_siemens_missing_slice_4sl"
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


def _record(receiver, series_uid: str):
    return ledger_of(receiver.layout.root).series(series_uid)


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
    assert storescu(receiver.settings.scp.port, dicom_dir / MR06).returncode == 0
    # the quiet time is a minute: what completes it within the wait is the evidence
    wait_until(lambda: receiver.completed, QUIET / 2, what="the enhanced MR series")
    [record] = receiver.completed
    assert record.instances == 1 and record.completed_by == "one multi-frame instance holds the volume"
    # the record on disk follows just after the series is handed on
    wait_until(lambda: _record(receiver, record.series_uid).completed_by == record.completed_by, 10,
               what="the series record to say what completed it")


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
    # the request is removed once the completion is recorded (just after the series is handed on)
    wait_until(lambda: not DataLayout(receiver.layout.root).completion_request(series_uid).exists(), 10,
               what="the completion request to be removed")
    # routed, as routing leaves it (this receiver's callback only collects)
    assert ledger_of(receiver.layout.root).route_series(series_uid, []) == []
    again = cli(series_uid)
    assert again.returncode == 1 and "is not being received: it is queued" in again.stdout
    assert cli("1.2.3.999").returncode == 2
    bad = cli("../../etc")
    assert bad.returncode == 2 and "not a valid Series Instance UID" in bad.stdout


def _temporal_series(dicom_dir, tmp_path, name: str, keep: int | None = None):
    """ct06's three slices at two temporal positions (a dynamic series), as one new series."""
    target = tmp_path / name
    target.mkdir()
    series_uid = generate_uid()
    files = sorted((dicom_dir / CT06).glob("*.dcm"))
    written = 0
    for temporal in (1, 2):
        for path in files:
            if keep is not None and written == keep:
                return target
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions = temporal, 2
            ds.save_as(target / f"{temporal}-{path.name}")
            written += 1
    return target


def _series_uid(folder) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def test_every_temporal_position_arrived_completes_a_dynamic_series(receiver, dicom_dir, tmp_path):
    partial = _temporal_series(dicom_dir, tmp_path, "partial", keep=5)
    whole = _temporal_series(dicom_dir, tmp_path, "whole")
    assert storescu(receiver.settings.scp.port, partial).returncode == 0
    assert storescu(receiver.settings.scp.port, whole).returncode == 0
    wait_until(lambda: receiver.completed, 15, what="the dynamic series with every temporal position")
    [record] = receiver.completed
    assert record.series_uid == _series_uid(whole) and record.instances == 6
    assert record.completed_by == "all 2 temporal positions of 3 slices arrived"
    # the partial one arrived first and still waits: the second temporal position lacks a slice
    assert _record(receiver, _series_uid(partial)).state == SeriesState.RECEIVING


def test_contiguity_is_recorded_with_the_series(receiver, dicom_dir):
    for folder in (CT06, CT08_MISSING_SLICE):
        assert storescu(receiver.settings.scp.port, dicom_dir / folder).returncode == 0
    wait_until(lambda: len(receiver.tracker.pending()) == 2, 15, what="both series received")
    receiver.tracker.complete_due(receiver.completed.append, now=time.time() + QUIET)
    records = {r.series_uid: r for r in receiver.completed}
    whole = records[_series_uid(dicom_dir / CT06)]
    assert whole.contiguous is True and whole.contiguity.startswith("3 slice positions, no gap wider than")
    gap = records[_series_uid(dicom_dir / CT08_MISSING_SLICE)]
    assert gap.contiguous is False and "1 gap(s) wider than the spacing" in gap.contiguity
    assert _record(receiver, gap.series_uid).contiguous is False  # kept on disk with the series


def test_a_trusted_sender_releasing_its_association_completes_what_it_sent(tmp_path, dicom_dir):
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": QUIET, "complete_on_release": ["CTSCANNER"]},
        storage={"data_dir": str(tmp_path / "data")},
    )
    completed: list[SeriesRecord] = []
    rx = Receiver(settings, completed.append)
    rx.start()
    try:
        assert storescu(settings.scp.port, dicom_dir / CT08_MISSING_SLICE, aet="WORKSTATION").returncode == 0
        assert storescu(settings.scp.port, dicom_dir / CT06, aet="CTSCANNER").returncode == 0
        wait_until(lambda: completed, 15, what="the series whose trusted sender released")
        [record] = completed
        assert record.series_uid == _series_uid(dicom_dir / CT06) and record.instances == 3
        assert record.completed_by == "CTSCANNER released the association that sent it"
        assert [r.series_uid for r in rx.tracker.pending()] == [_series_uid(dicom_dir / CT08_MISSING_SLICE)]
    finally:
        rx.stop()


def test_a_receiver_killed_mid_series_finishes_it_after_restart(tmp_path, dicom_dir):
    """SIGKILL between two parts of a series: after the restart the series counts every instance."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", scp={"host": "127.0.0.1", "port": port, "series_quiet_seconds": QUIET},
                          storage={"data_dir": str(tmp_path / "data")})
    first_part = _copies(dicom_dir, CT06, tmp_path, 3, keep=2)
    rest = tmp_path / "rest"
    rest.mkdir()
    [last] = sorted(set((_copies(dicom_dir, CT06, tmp_path, 3)).glob("*.dcm")), key=lambda p: p.name)[2:]
    last.rename(rest / last.name)
    series_uid = _series_uid(first_part)
    layout = DataLayout(tmp_path / "data")
    receiver = Pacsworker(["scp"], config, tmp_path / "scp1.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver to listen")
        assert storescu(port, first_part).returncode == 0
        assert len(series_files(layout.series_dir(series_uid))) == 2  # stored before each success answer
        receiver.kill()
        receiver = Pacsworker(["scp"], config, tmp_path / "scp2.log")
        wait_until(lambda: port_open(port), 60, what="the receiver to listen again")
        assert storescu(port, rest).returncode == 0
        record = wait_until(lambda: (r := ledger_of(layout.root).series(series_uid))
                            and r.state != SeriesState.RECEIVING and r, 20, what="the series to complete")
        assert record.instances == 3 and record.completed_by == "all 3 Images in Acquisition arrived"
        assert "1 series found pending in the spool after restart" in receiver.output()
    finally:
        receiver.stop()


@pytest.mark.parametrize("order", ["released, then closed", "closed, then released"])
def test_a_trusted_release_counts_whichever_event_comes_first(tmp_path, order):
    """pynetdicom reports the release and the closed connection from two threads, in either order (a
    sender closes as soon as it has the release response); the release counts either way."""
    from types import SimpleNamespace

    from pacsworker.scp.tracker import InstanceMeta

    settings = Settings(scp={"series_quiet_seconds": 3600, "complete_on_release": ["CTSCANNER"]},
                        storage={"data_dir": str(tmp_path / "data")})
    completed: list[SeriesRecord] = []
    rx = Receiver(settings, completed.append)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="CTSCANNER"), dul=SimpleNamespace(release_requested=True))
    series_uid = generate_uid()
    meta = InstanceMeta(study_uid=generate_uid(), series_uid=series_uid, sop_instance_uid=generate_uid(),
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", calling_aet="CTSCANNER",
                        association=id(assoc))
    rx.tracker.observe(meta)
    event = SimpleNamespace(assoc=assoc)
    handlers = [rx._handle_released, rx._handle_closed]
    for handler in handlers if order.startswith("released") else reversed(handlers):
        handler(event)
    rx.tracker.evidence_seconds = 0  # complete on the evidence at once
    wait_until(lambda: rx.tick() or completed, 10, what="the released series completed")
    assert [r.completed_by for r in completed] == ["CTSCANNER released the association that sent it"]


def test_a_closed_connection_without_release_is_no_evidence(tmp_path):
    from types import SimpleNamespace

    from pacsworker.scp.tracker import InstanceMeta

    settings = Settings(scp={"series_quiet_seconds": 3600, "complete_on_release": ["CTSCANNER"]},
                        storage={"data_dir": str(tmp_path / "data")})
    rx = Receiver(settings, lambda record: None)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="CTSCANNER"), dul=SimpleNamespace(release_requested=False))
    rx.tracker.observe(InstanceMeta(study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=generate_uid(),
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", calling_aet="CTSCANNER",
                                    association=id(assoc)))
    rx._handle_closed(SimpleNamespace(assoc=assoc))  # an abort, or a dropped connection
    rx.tracker.evidence_seconds = 0
    rx.tick()
    assert [r.state for r in rx.tracker.pending()] == [SeriesState.RECEIVING]
