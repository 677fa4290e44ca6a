"""The receiver on its own: compressed syntaxes stored as received, bad input refused, restarts survived."""

from __future__ import annotations

import logging
import time

import pydicom
import pytest
from conftest import echo_ok, free_port, wait_until
from wire_bytes import raw_store
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from pacsworker.config import Settings
from pacsworker.replay import replay
from pacsworker.scp.server import Receiver
from pacsworker.scp.spool import series_files

COMPRESSED = [
    "mr12_siemens_trio_4sl_j2k_lossless",
    "mr13_siemens_trio_4sl_jpeg_lossless",
    "mr14_siemens_trio_4sl_jpegls_lossless",
    "mr15_siemens_trio_4sl_rle",
    "ct06_ge_lightspeed_liver_3slice",  # implicit VR little endian
]


def _settings(tmp_path, **scp) -> Settings:
    return Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.5, **scp},
        storage={"data_dir": str(tmp_path / "data")},
    )


@pytest.fixture
def receiver(tmp_path):
    completed = []
    rx = Receiver(_settings(tmp_path, allowed_calling_aets=["MODALITY", "SCU"]), completed.append)
    rx.completed = completed
    rx.start()
    yield rx
    rx.stop()


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_and_implicit_series_stored_byte_for_byte(receiver, dicom_dir, name):
    port = receiver.settings.scp.port
    folder = dicom_dir / name
    originals = sorted(folder.glob("*.dcm"))
    # sent as stored (DCMTK's storescu would decompress J2K/JPEG-LS/RLE without extra options)
    report = replay([folder], "127.0.0.1", port, "PACSWORKER", "SCU")
    assert report.sent == len(originals) and not report.failed
    wait_until(lambda: receiver.completed, 30, what="series completion")
    sent = pydicom.dcmread(originals[0])
    [record] = receiver.completed
    assert (record.series_uid, record.instances, record.modality) == (sent.SeriesInstanceUID, len(originals), sent.Modality)
    folder_out = receiver.layout.series_dir(record.series_uid)
    assert len(series_files(folder_out)) == len(originals)
    copy = pydicom.dcmread(folder_out / f"{sent.SOPInstanceUID}.dcm")
    assert copy.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert copy.PixelData == sent.PixelData


def _raw_store(port: int, payload: bytes, sop_uid: str) -> int:
    return raw_store(port, payload, sop_uid, ExplicitVRLittleEndian, CTImageStorage)


def _ct_bytes(sop_uid: str, series_uid: str) -> bytes:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), series_uid, "CT"
    return encode(ds, False, True)


def test_bad_input_is_refused_and_the_receiver_keeps_serving(receiver, caplog):
    port = receiver.settings.scp.port
    caplog.set_level(logging.WARNING, logger="pacsworker.scp")
    assert _raw_store(port, b"this is not DICOM at all" * 10, "1.2.3.4") == 0xC000
    assert "refused C-STORE 1.2.3.4 from SCU: element (6874,7369) at byte 0 has no valid VR (0x2069)" in caplog.text
    bad_uid = "1.2.840.abc/../../etc"
    assert _raw_store(port, _ct_bytes(bad_uid, generate_uid()), "1.2.3.5") == 0xC000
    assert "SOPInstanceUID '1.2.840.abc/../../etc' is missing or not a valid UID" in caplog.text
    assert not any(receiver.layout.root.rglob("*etc*"))
    assert echo_ok(port)


def test_aborted_association_keeps_what_arrived(receiver):
    port = receiver.settings.scp.port
    series = generate_uid()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")
    for n in range(3):
        assert _store_in(assoc, series) == 0
    assoc.abort()
    wait_until(lambda: any(r.series_uid == series for r in receiver.completed), 30, what="series completion")
    [record] = [r for r in receiver.completed if r.series_uid == series]
    assert record.instances == 3 and len(series_files(receiver.layout.series_dir(series))) == 3
    assert echo_ok(port)


def _store_in(assoc, series_uid: str) -> int:
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", series_uid, "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return assoc.send_c_store(ds).Status


def test_wrong_ae_titles_are_rejected(receiver):
    port = receiver.settings.scp.port
    assert not echo_ok(port, aec="SOMEONE_ELSE")
    assert not echo_ok(port, aet="INTRUDER")
    assert echo_ok(port)


def test_pending_series_survive_a_restart(tmp_path):
    settings = _settings(tmp_path, series_quiet_seconds=3600)
    first = Receiver(settings, lambda record: None)
    first.start()
    series = generate_uid()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title="PACSWORKER")
    for _ in range(2):
        assert _store_in(assoc, series) == 0
    assoc.release()
    first.stop()

    time.sleep(1.5)  # the instances' mtimes are now older than the quiet time below

    completed = []
    second = Receiver(settings.model_copy(update={"scp": settings.scp.model_copy(update={"series_quiet_seconds": 1.0})}), completed.append)
    assert second.tracker.rebuild() == 1
    restarted = time.time()
    # the quiet time runs from the restart, not from the last instance's mtime: the sender may resend
    second.tracker.complete_due(completed.append, now=restarted + 0.5)
    assert completed == []
    second.tracker.complete_due(completed.append, now=restarted + 1.5)
    assert [(r.series_uid, r.instances) for r in completed] == [(series, 2)]


def test_unfinished_spool_writes_are_removed_at_start(tmp_path):
    settings = _settings(tmp_path)
    series = generate_uid()
    folder = tmp_path / "data" / "spool" / series
    folder.mkdir(parents=True)
    orphan = folder / f".tmp-{generate_uid()}.4242"  # a write a crash interrupted: never acknowledged
    orphan.write_bytes(b"\0" * 1000)
    receiver = Receiver(settings, lambda record: None)
    receiver.start()
    try:
        assert not orphan.exists()
        assert receiver.tracker.pending() == []  # a folder holding only temporaries is no series
    finally:
        receiver.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem for data_dir (tmpfs, mounted by root)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        from conftest import missing

        missing("permission to mount a small tmpfs (root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_a700_leaves_nothing_half_written_and_recovers(small_disk, dicom_dir, caplog):
    caplog.set_level(logging.ERROR, logger="pacsworker.scp")
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 3600},
        storage={"data_dir": str(small_disk / "data"), "min_free_bytes": 0},  # the disk itself runs out
    )
    rx = Receiver(settings, lambda record: None)
    rx.start()
    try:
        files = sorted((dicom_dir / "ct02_philips_ingenuity_headphantom_5mm").glob("*.dcm"))[:10]  # 5 MB
        report = replay(files, "127.0.0.1", settings.scp.port, "PACSWORKER", "SCU")
        statuses = {reason for _, reason in report.failed}
        assert report.sent >= 1 and report.failed, "the 3 MiB disk should take some instances, not all"
        assert all("0xA700" in reason for reason in statuses), statuses
        assert "No space left on device" in caplog.text
        # every acknowledged instance is whole; nothing partial in the spool or incoming
        stored = list(rx.layout.spool.glob("*/*.dcm"))
        assert len(stored) == report.sent
        for path in stored:
            assert pydicom.dcmread(path).pixel_array.shape == (512, 512)
        assert not list(rx.layout.spool.glob("*/.tmp-*")) and not list(rx.layout.incoming.iterdir())
        # space comes back: service resumes by itself
        for path in stored:
            path.unlink()
        again = replay(files[:3], "127.0.0.1", settings.scp.port, "PACSWORKER", "SCU")
        assert again.sent == 3 and not again.failed
    finally:
        rx.stop()


def test_a_disk_below_its_reserve_refuses_with_a700_and_recovers_by_itself(tmp_path, dicom_dir, caplog):
    import shutil

    from pydicom.uid import ImplicitVRLittleEndian

    caplog.set_level(logging.INFO, logger="pacsworker")
    settings = _settings(tmp_path)
    completed = []
    receiver = Receiver(settings, completed.append)
    receiver.start()
    files = sorted((dicom_dir / "ct06_ge_lightspeed_liver_3slice").glob("*.dcm"))

    def send() -> list[int]:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", settings.scp.port, ae_title="PACSWORKER")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in files]
        assoc.release()
        return statuses

    try:
        # a reserve larger than the free space, as when the disk fills up
        settings.storage.min_free_bytes = shutil.disk_usage(tmp_path).free + (1 << 30)
        assert send() == [0xA700] * 3
        assert "below the reserve" in caplog.text and "instances are refused with 0xA700" in caplog.text
        time.sleep(1)
        assert completed == [] and not list(receiver.layout.spool.rglob("*.dcm"))  # nothing half-written
        assert not [p for p in receiver.layout.incoming.iterdir() if p.is_file()]
        settings.storage.min_free_bytes = 1 << 20  # space again: service resumes by itself
        assert send() == [0x0000] * 3
        assert "free again" in caplog.text
        wait_until(lambda: completed, 30, what="the series after space returned")
        assert completed[0].instances == 3
    finally:
        receiver.stop()


def _end_lines(caplog, calling: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"association from {calling} (")
            and " accepted" not in r.getMessage() and "peer proposed" not in r.getMessage()]


def test_each_association_end_is_logged_with_what_it_stored_and_how_it_ended(receiver, caplog):
    caplog.set_level(logging.INFO, logger="pacsworker.scp")
    port = receiver.settings.scp.port
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")
    local_port = assoc.requestor.port
    assert [_store_in(assoc, generate_uid()) for _ in range(2)] == [0, 0]
    assert _raw_store(port, b"\xde\xad" * 8, "1.2.3.4") == 0xC000  # another association, refused
    assoc.release()
    wait_until(lambda: len(_end_lines(caplog, "SCU")) == 2, 10, what="both associations' end lines")
    lines = _end_lines(caplog, "SCU")
    assert f"association from SCU (127.0.0.1:{local_port}) released: 2 instance(s) stored, 0 refused" in lines
    assert any(line.endswith("released: 0 instance(s) stored, 1 refused") for line in lines)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSWORKER")
    assert _store_in(assoc, generate_uid()) == 0
    assoc.abort()
    wait_until(lambda: len(_end_lines(caplog, "SCU")) == 3, 10, what="the aborted association's end line")
    ended = _end_lines(caplog, "SCU")[-1]
    assert " aborted" in ended and ended.endswith(": 1 instance(s) stored (kept), 0 refused")


def test_a_query_retrieve_peer_is_told_that_only_storage_is_offered(receiver, caplog):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    caplog.set_level(logging.INFO, logger="pacsworker.scp")
    ae = AE(ae_title="SCU")
    ae.add_requested_context(FIND)
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", receiver.settings.scp.port, ae_title="PACSWORKER")
    assert not assoc.is_established  # pynetdicom aborts when nothing it proposed was accepted
    wait_until(lambda: len(_end_lines(caplog, "SCU")) == 1, 10, what="the association's end line")
    [said] = [r for r in caplog.records if "peer proposed" in r.getMessage()]
    assert said.levelno == logging.WARNING
    assert said.getMessage().endswith(
        "peer proposed Study Root Query/Retrieve Information Model - FIND; Study Root Query/Retrieve Information "
        "Model - MOVE, not offered: pacsworker only stores (Storage and Verification)")


def test_a_request_for_a_service_not_offered_is_named(receiver, caplog):
    from pydicom.dataset import Dataset
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    caplog.set_level(logging.INFO, logger="pacsworker.scp")
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", receiver.settings.scp.port, ae_title="PACSWORKER")
    assert assoc.is_established
    [rejected] = [cx for cx in assoc.rejected_contexts]
    request = C_FIND()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, FIND, 2
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    request.Identifier = encode_for_test(query)
    assoc.dimse.send_msg(request, rejected.context_id)  # what pynetdicom's own send_c_find would refuse to send
    wait_until(lambda: _end_lines(caplog, "SCU"), 10, what="the association to end")
    [said] = [r.getMessage() for r in caplog.records if "C-FIND request" in r.getMessage()]
    assert said.startswith("C-FIND request (Study Root Query/Retrieve Information Model - FIND) from SCU (127.0.0.1:")
    assert said.endswith("on a presentation context that was not accepted: pacsworker only stores (C-STORE, C-ECHO)")


def encode_for_test(ds):
    from io import BytesIO

    from pynetdicom.dsutils import encode

    return BytesIO(encode(ds, True, True))
