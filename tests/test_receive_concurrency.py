"""Four modalities sending at once: every instance of every series lands whole, in its own series."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from conftest import free_port, storescu, wait_until
from pydicom.uid import generate_uid

from pacsworker.config import Settings
from pacsworker.scp.server import Receiver
from pacsworker.scp.spool import series_files

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
SENDERS = 4


@pytest.fixture
def receiver(tmp_path):
    completed = []
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 1.0},
        storage={"data_dir": str(tmp_path / "data")},
    )
    rx = Receiver(settings, completed.append)
    rx.completed = completed
    rx.start()
    yield rx
    rx.stop()


def _series_copies(source, target, count: int) -> list[tuple[str, dict]]:
    """``count`` copies of a series, each with its own Series and SOP Instance UIDs; returns
    (series UID, {SOP Instance UID: pixel bytes}) per copy."""
    copies = []
    for index in range(count):
        folder = target / f"series{index}"
        folder.mkdir(parents=True)
        series_uid, pixels = generate_uid(), {}
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / path.name, enforce_file_format=True)
            pixels[ds.SOPInstanceUID] = ds.PixelData
        copies.append((series_uid, pixels))
    return copies


def test_parallel_associations_each_land_whole(receiver, dicom_dir, tmp_path):
    copies = _series_copies(dicom_dir / CT02, tmp_path / "sent", SENDERS)
    port = receiver.settings.scp.port
    with ThreadPoolExecutor(SENDERS) as pool:
        results = list(pool.map(lambda i: storescu(port, tmp_path / "sent" / f"series{i}", aet=f"MODALITY{i}"),
                                range(SENDERS)))
    for result in results:
        assert isinstance(result, subprocess.CompletedProcess) and result.returncode == 0, result.stderr[-2000:]

    for series_uid, pixels in copies:
        stored = series_files(receiver.layout.series_dir(series_uid))
        assert sorted(p.stem for p in stored) == sorted(pixels), "each instance in its own series folder"
        for path in stored:
            ds = pydicom.dcmread(path)
            assert ds.SeriesInstanceUID == series_uid
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == path.stem
            assert ds.PixelData == pixels[path.stem], "pixel data as sent"
    # nothing half-written left behind by any association
    assert list(receiver.layout.incoming.iterdir()) == []
    assert not [p for p in receiver.layout.spool.rglob(".tmp-*")]

    wait_until(lambda: len(receiver.completed) == SENDERS, 30, what="all four series complete")
    assert sorted((r.series_uid, r.instances) for r in receiver.completed) == sorted(
        (series_uid, len(pixels)) for series_uid, pixels in copies
    )
