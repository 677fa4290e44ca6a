"""DICOMweb in: STOW-RS into the receiver, with dicomweb-client as the sender."""

from __future__ import annotations

import time

import pydicom
import pytest
import requests
from conftest import free_port, wait_until
from dicomweb_client.api import DICOMwebClient

from pacsworker.config import Settings
from pacsworker.multipart import encode_multipart
from pacsworker.scp.server import Receiver

CT06 = "ct06_ge_lightspeed_liver_3slice"


@pytest.fixture
def receiver(tmp_path):
    settings = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "stow_port": free_port(), "series_quiet_seconds": 1},
        storage={"data_dir": str(tmp_path / "data")},
    )
    completed = []
    rx = Receiver(settings, completed.append)
    rx.completed = completed
    rx.start()
    yield rx
    rx.stop()


def test_stow_rs_stores_tracks_and_answers_per_instance(receiver, dicom_dir):
    files = sorted((dicom_dir / CT06).glob("*.dcm"))
    datasets = [pydicom.dcmread(path) for path in files]
    url = f"http://127.0.0.1:{receiver.settings.scp.stow_port}"
    answer = DICOMwebClient(url=url).store_instances(datasets)
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
    assert stored == {str(ds.SOPInstanceUID) for ds in datasets} and "FailedSOPSequence" not in answer
    wait_until(lambda: receiver.completed, 20, what="the series received over STOW-RS")
    [record] = receiver.completed
    assert record.instances == 3 and record.calling_aet == "STOW-RS"
    folder = receiver.layout.series_dir(record.series_uid)
    for ds in datasets:  # the client encodes its own Part 10 files; the content is what was sent
        copy = pydicom.dcmread(folder / f"{ds.SOPInstanceUID}.dcm")
        assert copy.PixelData == ds.PixelData and copy.ImagePositionPatient == ds.ImagePositionPatient


def test_stow_rs_refuses_what_is_not_whole_and_says_which(receiver, dicom_dir):
    url = f"http://127.0.0.1:{receiver.settings.scp.stow_port}/studies"
    good = sorted((dicom_dir / CT06).glob("*.dcm"))[0].read_bytes()
    truncated = good[: len(good) // 2]
    body, content_type = encode_multipart([("application/dicom", good), ("application/dicom", truncated),
                                           ("application/dicom", b"not dicom at all")])
    answer = requests.post(url, data=body, headers={"Content-Type": content_type + '; type="application/dicom"'}, timeout=30)
    assert answer.status_code == 202  # some stored, some not
    result = answer.json()
    assert len(result["00081199"]["Value"]) == 1
    reasons = [item["00081197"]["Value"][0] for item in result["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]
    # none stored: 409; a study that is not the instance's: refused with the reason
    body, content_type = encode_multipart([("application/dicom", good)])
    other = requests.post(f"{url}/1.2.3.4", data=body, headers={"Content-Type": content_type}, timeout=30)
    assert other.status_code == 409 and other.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert requests.post(url, data=b"x", headers={"Content-Type": "application/json"}, timeout=30).status_code == 415
    assert requests.post(f"{url}/../etc", data=body, headers={"Content-Type": content_type}, timeout=30).status_code == 404
    time.sleep(1.5)
    stored = list(receiver.layout.spool.rglob("*.dcm"))
    assert len(stored) == 1 and stored[0].read_bytes() == good  # nothing half-written from the truncated part


def test_pull_fetches_a_study_from_a_pacs_as_if_it_had_been_sent(tmp_path, dicom_dir):
    import subprocess
    import sys

    from conftest import Orthanc, write_config

    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        datasets = [pydicom.dcmread(path) for path in sorted((dicom_dir / CT06).glob("*.dcm"))]
        DICOMwebClient(url=pacs.dicomweb_url).store_instances(datasets)
        study = str(datasets[0].StudyInstanceUID)
        stow_port = free_port()
        settings = Settings(
            scp={"host": "127.0.0.1", "port": free_port(), "stow_port": stow_port, "series_quiet_seconds": 1,
                 "pull_url": pacs.dicomweb_url},
            storage={"data_dir": str(tmp_path / "data")},
        )
        completed = []
        receiver = Receiver(settings, completed.append)
        receiver.start()
        try:
            config = write_config(tmp_path / "c.yaml", scp=settings.scp.model_dump(mode="json", exclude_none=True),
                                  storage={"data_dir": str(tmp_path / "data")})
            pulled = subprocess.run([sys.executable, "-m", "pacsworker", "pull", "--study", study, "--config", str(config)],
                                    capture_output=True, text=True, timeout=120)
            said = " ".join((pulled.stdout + pulled.stderr).split())
            assert pulled.returncode == 0 and f"study {study}: 1 series, 3 instance(s) stored, 0 refused" in said, said
            wait_until(lambda: completed, 20, what="the pulled series")
            [record] = completed
            assert record.instances == 3 and record.series_uid == str(datasets[0].SeriesInstanceUID)
            copy = pydicom.dcmread(receiver.layout.series_dir(record.series_uid) / f"{datasets[0].SOPInstanceUID}.dcm")
            assert copy.PixelData == datasets[0].PixelData
            # a study the PACS does not have: the reason comes back
            missing = requests.post(f"http://127.0.0.1:{stow_port}/pull", json={"study": "1.2.3.4"}, timeout=60)
            assert missing.status_code in (200, 502) and (missing.status_code == 502 or missing.json()["stored"] == 0)
            bad = requests.post(f"http://127.0.0.1:{stow_port}/pull", json={"study": "../x"}, timeout=60)
            assert bad.status_code == 400
        finally:
            receiver.stop()
    finally:
        pacs.stop()
