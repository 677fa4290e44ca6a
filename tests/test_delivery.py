"""Delivery of results to real PACS: STOW-RS and C-STORE to Orthanc, behind a token gateway and TLS.

One Orthanc for the module, with basic authentication, a called-AE check and a Lua filter that
notes every instance it receives (so a test can count what was sent) and refuses the SOP Instance
UIDs listed in a file (Orthanc then answers C-STORE with 0xA700 and STOW-RS with HTTP 500).
Outboxes hold the SEG and SRs ct-body makes of ct02, with fresh UIDs per job.
"""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import Orthanc, Pacsworker, free_port, ledger_of, status_json, wait_until, write_config
from pacs_gateway import PacsGateway
from pydicom.uid import generate_uid

from pacsworker.config import ConfigError, Settings, load_settings
from pacsworker.destinations.dicomweb import read_store_response
from pacsworker.destinations.dimse import status_verdict
from pacsworker.destinations import outbox
from pacsworker.destinations.outbox import Superseded, backoff_seconds
from pacsworker.destinations.outcome import Verdict
from pacsworker.records import (
    DataLayout,
    DeliveryRecord,
    DeliveryState,
    DestinationOutcome,
    InstanceOutcome,
    JobState,
)

CT02 = "ct02_philips_ingenuity_headphantom_5mm"
USER, PASSWORD = "pacsworker", "s3cret-Pw-4711"
CLIENT_ID, CLIENT_SECRET = "pacsworker-client", "cl13nt-S3cret"

FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  local uid = dicom.SOPInstanceUID
  local seen = io.open("{received}", "a")
  seen:write(uid .. "\\n")
  seen:close()
  local refused = io.open("{refuse}", "r")
  if refused ~= nil then
    local text = refused:read("*a")
    refused:close()
    if string.find(text, "\\n" .. uid .. "\\n", 1, true) then
      error("refused by the test")
    end
  end
  return true
end
"""


class SecuredOrthanc(Orthanc):
    """Orthanc with basic auth, DicomCheckCalledAet, and the counting and refusing Lua filter."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.received_log, self.refuse_file = workdir / "received.log", workdir / "refuse.txt"
        script = workdir / "filter.lua"
        script.write_text(FILTER.replace("{received}", str(self.received_log)).replace("{refuse}", str(self.refuse_file)))
        config = json.loads(self.config.read_text())
        config.update(AuthenticationEnabled=True, RegisteredUsers={USER: PASSWORD}, DicomCheckCalledAet=True,
                      LuaScripts=[str(script)])
        self.config.write_text(json.dumps(config))

    def _alive(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=1).ok
        except requests.RequestException:
            return False

    def refuse(self, *uids: str) -> None:
        self.refuse_file.write_text("\n" + "\n".join(uids) + "\n")

    def received(self) -> Counter:
        """How often each SOP Instance UID reached Orthanc (stored, refused or already there)."""
        return Counter(self.received_log.read_text().split()) if self.received_log.exists() else Counter()

    def copies(self, sop_uid: str) -> int:
        """How many instances with this SOP Instance UID Orthanc holds."""
        found = requests.post(f"{self.url}/tools/lookup", data=sop_uid, auth=(USER, PASSWORD), timeout=10).json()
        return sum(1 for item in found if item["Type"] == "Instance")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = SecuredOrthanc(tmp_path_factory.mktemp("pacs")).start()
    yield server
    if server.proc is not None:
        server.stop()


@pytest.fixture(scope="module")
def results(dicom_dir):
    """The SEG and SRs ct-body makes of ct02 (file name -> dataset)."""
    from pacsworker.config import ModelSettings
    from pacsworker.replay import collect_files
    from pacsworker.worker.runtime import run_model

    return run_model(collect_files([dicom_dir / CT02]), ModelSettings(name="ct-body")).result_objects()


def make_outbox(data_dir: Path, results: dict, destinations: list[str], fresh: bool = True) -> str:
    """A job in the outbox, as the worker leaves it: result files, delivery.json and the job record."""
    layout = DataLayout(data_dir).create()
    job_id = f"ct-body_test_{uuid.uuid4().hex[:8]}"
    folder = layout.job_outbox(job_id)
    folder.mkdir(parents=True)
    uids = {}
    for name, ds in results.items():
        ds = copy.deepcopy(ds) if fresh else ds
        if fresh:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
        ds.save_as(folder / name, enforce_file_format=True)
        uids[name] = str(ds.SOPInstanceUID)
    _delivering(data_dir, job_id, uids, destinations)
    return job_id


def _delivering(data_dir: Path, job_id: str, uids: dict[str, str], destinations: list[str]) -> None:
    """In the ledger: the job ran and its results wait for each destination."""
    from pacsworker.ledger import NewJob, SeriesFacts

    ledger = ledger_of(data_dir)
    ledger.record_instance(SeriesFacts("1.2.3", "1.2"))
    ledger.create_job(NewJob(job_id, "1.2.3", "1.2", "ct-body", inputs={"1.2.3": []}))
    claim = ledger.claim_job(job_id, "w", 3, 60)
    assert claim.won and ledger.finish_job(job_id, "w", 1, JobState.DELIVERING, results=uids, destinations=destinations)


def record_of(data_dir: Path, job_id: str) -> DeliveryRecord | None:
    """What the ledger holds of a job's delivery, in the shape an operator reads it."""
    ledger = ledger_of(data_dir)
    job, rows, instances = ledger.job(job_id), ledger.deliveries_of(job_id), ledger.delivered_instances(job_id)
    if job is None or not rows:
        return None
    pending = [r.next_attempt_at for r in rows if r.state == DeliveryState.PENDING]
    return DeliveryRecord(
        job_id=job_id, files=sorted({i.file_name for i in instances}),
        sop_instance_uids={i.file_name: i.sop_instance_uid for i in instances},
        started_at=job.delivery_started_at, task_id=job.delivery_task, next_attempt_at=min(pending, default=0.0),
        destinations={r.destination: DestinationOutcome(
            state=r.state, attempts=r.attempts, last_error=r.last_error, permanent=r.permanent,
            delivered_at=r.delivered_at or 0.0, next_attempt_at=r.next_attempt_at or 0.0,
            dead_lettered_at=r.dead_lettered_at or 0.0,
            instances={i.file_name: InstanceOutcome(state=i.state, detail=i.detail or "",
                                                    delivered_at=i.delivered_at or 0.0)
                       for i in instances if i.destination == r.destination})
            for r in rows})


def attempt_delivery(settings: Settings, layout: DataLayout, job_id: str, now: float | None = None,
                     task_id: str = "") -> DeliveryRecord | None:
    """One delivery attempt, as if the database's clock said ``now`` (later than it does: time passed)."""
    if now is not None:
        _pass_time(settings.data_dir, job_id, now - ledger_of(settings.data_dir).now())
    if outbox.attempt_delivery(settings, layout, job_id, task_id=task_id) is None:
        return None
    return record_of(settings.data_dir, job_id)


def _pass_time(data_dir: Path, job_id: str, seconds: float) -> None:
    """Move a job's delivery times ``seconds`` into the past: what was due by then is due now."""
    from sqlalchemy import update

    from pacsworker.ledger.schema import deliveries, jobs

    if seconds <= 0:
        return
    with ledger_of(data_dir).engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.job_id == job_id, deliveries.c.next_attempt_at > 0)
                     .values(next_attempt_at=deliveries.c.next_attempt_at - seconds))
        conn.execute(update(jobs).where(jobs.c.job_id == job_id)
                     .values(delivery_started_at=jobs.c.delivery_started_at - seconds))


def settings_for(tmp_path: Path, *destinations: dict, **delivery) -> Settings:
    return Settings(storage={"data_dir": str(tmp_path / "data")}, destinations=list(destinations),
                    delivery={"backoff_base_seconds": 0.5, "backoff_max_seconds": 1, **delivery})


def stow(pacs: SecuredOrthanc, name: str = "pacs-web", **extra) -> dict:
    auth = {"kind": "basic", "username": USER, "password_env": "TEST_PACS_PASSWORD"}
    return {"kind": "dicomweb", "name": name, "url": pacs.dicomweb_url, "auth": auth, **extra}


def cstore(pacs: SecuredOrthanc, name: str = "pacs-dimse", **extra) -> dict:
    return {"kind": "dimse", "name": name, "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC",
            "timeout_seconds": 10, **extra}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsworker", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def uids_of(data_dir: Path, job_id: str) -> dict[str, str]:
    return record_of(data_dir, job_id).sop_instance_uids


# --- against the real PACS ---------------------------------------------------------------------


def test_pacs_down_then_up_everything_arrives_once(tmp_path, results, pacs, monkeypatch):
    """A delivery worker retries both destinations while Orthanc is down; once it is up every
    instance arrives, once per destination, and each SOP Instance UID is stored once."""
    monkeypatch.setenv("TEST_PACS_PASSWORD", PASSWORD)
    data = tmp_path / "data"
    config = write_config(tmp_path / "pacsworker.yaml", storage={"data_dir": str(data)},
                          destinations=[stow(pacs), cstore(pacs)],
                          delivery={"backoff_base_seconds": 0.5, "backoff_max_seconds": 1})
    pacs.stop()
    jobs = [make_outbox(data, results, ["pacs-web", "pacs-dimse"]) for _ in range(2)]
    worker = Pacsworker(["worker", "--queues", "delivery", "--pool", "threads", "--concurrency", "2"], config,
                        tmp_path / "worker.log")
    try:
        assert cli(config, "deliveries", "retry", *jobs).returncode == 0  # due now: the worker takes them

        def retried_while_down():
            return all(o.attempts >= 2 for job in jobs for o in record_of(data, job).destinations.values())

        wait_until(retried_while_down, 90, what="two failed attempts per destination")
        for job in jobs:
            for outcome in record_of(data, job).destinations.values():
                assert outcome.state == DeliveryState.PENDING and not outcome.permanent, outcome
        pacs.start()
        wait_until(lambda: all(record_of(data, job).complete for job in jobs), 90, what="delivery once Orthanc is up")
    finally:
        worker.stop()
        print(worker.output()[-6000:])  # shown when the test fails
    received = pacs.received()
    for job in jobs:
        for uid in uids_of(data, job).values():
            assert pacs.copies(uid) == 1
            assert received[uid] == 2, f"{uid} reached Orthanc {received[uid]} times; once per destination expected"
        assert ledger_of(data).job(job).state == JobState.DONE
    state = status_json(config)
    assert state["pending_deliveries"] == {} and state["dead_letters"] == {}
    log = worker.output()
    assert "delivery failed to pacs-web" in log and "delivery failed to pacs-dimse" in log
    assert PASSWORD not in log and "Traceback" not in log


def test_basic_auth_from_a_file_and_already_stored(tmp_path, results, pacs):
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    destination = stow(pacs, auth={"kind": "basic", "username": USER, "password_file": str(secret)})
    settings = settings_for(tmp_path, destination)
    first = make_outbox(settings.data_dir, results, ["pacs-web"])
    assert attempt_delivery(settings, DataLayout(settings.data_dir), first).complete
    # the same results again (a re-run makes the same UIDs): Orthanc has them; that counts as delivered
    again = make_outbox(settings.data_dir, {name: pydicom.dcmread(settings.data_dir / "outbox" / first / name)
                                            for name in results}, ["pacs-web"], fresh=False)
    record = attempt_delivery(settings, DataLayout(settings.data_dir), again)
    assert record.complete and record.destinations["pacs-web"].attempts == 1
    for uid in uids_of(settings.data_dir, first).values():
        assert pacs.copies(uid) == 1 and pacs.received()[uid] == 2


def test_wrong_password_is_permanent_surfaced_and_retried_by_the_operator(tmp_path, results, pacs, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pacsworker")
    monkeypatch.setenv("TEST_PACS_PASSWORD", "not-the-password")
    settings = settings_for(tmp_path, stow(pacs))
    layout = DataLayout(settings.data_dir)
    config = write_config(tmp_path / "pacsworker.yaml", storage={"data_dir": str(settings.data_dir)},
                          destinations=[stow(pacs)])
    job = make_outbox(settings.data_dir, results, ["pacs-web"])
    record = attempt_delivery(settings, layout, job)
    outcome = record.destinations["pacs-web"]
    assert outcome.state == DeliveryState.DEAD_LETTER and outcome.permanent and outcome.attempts == 1
    assert "HTTP 401" in outcome.last_error and "credentials refused" in outcome.last_error
    assert "failed permanently, dead-lettered" in caplog.text and "HTTP 401" in caplog.text
    assert "not-the-password" not in caplog.text
    # never retried on its own
    assert attempt_delivery(settings, layout, job, now=outcome.dead_lettered_at + 10**6).destinations[
        "pacs-web"].attempts == 1
    state = status_json(config)
    letter = state["dead_letters"][job]["pacs-web"]
    assert letter["permanent"] and "HTTP 401" in letter["reason"] and len(letter["instances"]) == len(results)
    assert "delivery dead-lettered" in state["failed_jobs"][job]
    table = cli(config, "status")
    assert "dead letter" in table.stdout and "HTTP 401" in table.stdout
    # the operator fixes the password, then retries: delivered, the job is done
    monkeypatch.setenv("TEST_PACS_PASSWORD", PASSWORD)
    retried = cli(config, "deliveries", "retry", "--all")
    assert retried.returncode == 0 and "sending again to pacs-web" in retried.stderr, retried.stderr
    assert ledger_of(settings.data_dir).job(job).state == JobState.DELIVERING
    record = attempt_delivery(settings, layout, job)
    assert record.complete and record.destinations["pacs-web"].attempts == 2
    assert ledger_of(settings.data_dir).job(job).state == JobState.DONE
    assert cli(config, "deliveries", "retry", "--all").returncode == 1  # nothing left to retry


def test_stow_resends_only_the_failed_instance(tmp_path, results, pacs, monkeypatch):
    monkeypatch.setenv("TEST_PACS_PASSWORD", PASSWORD)
    settings = settings_for(tmp_path, stow(pacs, instances_per_request=1))
    layout = DataLayout(settings.data_dir)
    job = make_outbox(settings.data_dir, results, ["pacs-web"])
    uids = uids_of(settings.data_dir, job)
    pacs.refuse(uids["sr.dcm"])
    record = attempt_delivery(settings, layout, job)
    outcome = record.destinations["pacs-web"]
    assert outcome.state == DeliveryState.PENDING and not outcome.permanent
    assert {f: i.state for f, i in outcome.instances.items()} == {
        name: DeliveryState.PENDING if name == "sr.dcm" else DeliveryState.DELIVERED for name in results}
    # Orthanc 1.10 answers 200 with empty sequences when it did not store it: not named, so not delivered
    assert outcome.instances["sr.dcm"].detail == "not named in the STOW-RS response"
    assert uids["sr.dcm"] in outcome.last_error
    pacs.refuse()
    record = attempt_delivery(settings, layout, job, now=outcome.next_attempt_at)
    assert record.complete
    received = pacs.received()
    assert {name: received[uid] for name, uid in uids.items()} == {name: 2 if name == "sr.dcm" else 1 for name in results}


def test_cstore_to_orthanc_resends_only_the_refused_instance(tmp_path, results, pacs):
    settings = settings_for(tmp_path, cstore(pacs))
    layout = DataLayout(settings.data_dir)
    job = make_outbox(settings.data_dir, results, ["pacs-dimse"])
    uids = uids_of(settings.data_dir, job)
    pacs.refuse(uids["seg.dcm"])
    outcome = attempt_delivery(settings, layout, job).destinations["pacs-dimse"]
    assert outcome.state == DeliveryState.PENDING and not outcome.permanent
    assert outcome.instances["seg.dcm"].detail == "refused 0xA700: Refused: Out of Resources"
    assert sorted(f for f, i in outcome.instances.items() if i.state == DeliveryState.DELIVERED) == sorted(
        name for name in results if name != "seg.dcm")
    pacs.refuse()
    record = attempt_delivery(settings, layout, job, now=outcome.next_attempt_at)
    assert record.complete and record.destinations["pacs-dimse"].attempts == 2
    received = pacs.received()
    assert {name: received[uid] for name, uid in uids.items()} == {name: 2 if name == "seg.dcm" else 1 for name in results}
    for uid in uids.values():
        assert pacs.copies(uid) == 1


def test_cstore_rejections_and_an_unreachable_pacs(tmp_path, results, pacs):
    settings = settings_for(tmp_path, cstore(pacs, name="wrong-ae", ae_title="NOT-ORTHANC"),
                            cstore(pacs, name="nobody", port=free_port()), max_age_seconds=30)
    layout = DataLayout(settings.data_dir)
    job = make_outbox(settings.data_dir, results, ["wrong-ae", "nobody"])
    record = attempt_delivery(settings, layout, job, now=record_of(settings.data_dir, job).started_at)
    wrong, nobody = record.destinations["wrong-ae"], record.destinations["nobody"]
    assert wrong.state == DeliveryState.DEAD_LETTER and wrong.permanent
    assert "Rejected Permanent" in wrong.last_error and "Called AE title not recognised" in wrong.last_error
    assert nobody.state == DeliveryState.PENDING and not nobody.permanent and "no association" in nobody.last_error
    # retried with backoff until delivery.max_age_seconds, then dead-lettered as used up
    start = record.started_at
    attempted = ledger_of(settings.data_dir).now()  # after the attempt (by the database's clock)
    assert start + 0.25 <= nobody.next_attempt_at <= attempted + 0.5 + 0.01
    record = attempt_delivery(settings, layout, job, now=start + 31)
    nobody = record.destinations["nobody"]
    assert nobody.state == DeliveryState.DEAD_LETTER and not nobody.permanent
    # how long it tried: 31 s by then, and what the attempt itself took on a loaded machine
    assert re.match(r"gave up after 2 attempts in 3[1-5] s: ", nobody.last_error), nobody.last_error
    assert record.dead_lettered and not record.pending


def test_oauth2_token_expires_and_is_revoked_mid_run(tmp_path, results, pacs, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="pacsworker")
    monkeypatch.setenv("TEST_CLIENT_SECRET", CLIENT_SECRET)
    gateway = PacsGateway(pacs.url, (USER, PASSWORD), client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                          token_lifetime=1.5)
    try:
        auth = {"kind": "oauth2", "token_url": f"{gateway.url}/token", "client_id": CLIENT_ID,
                "client_secret_env": "TEST_CLIENT_SECRET", "scope": "dicomweb.write"}
        settings = settings_for(tmp_path, {"kind": "dicomweb", "name": "gateway", "url": f"{gateway.url}/dicom-web",
                                           "auth": auth})
        layout = DataLayout(settings.data_dir)

        def deliver_one() -> None:
            job = make_outbox(settings.data_dir, results, ["gateway"])
            outcome = attempt_delivery(settings, layout, job).destinations["gateway"]
            assert outcome.state == DeliveryState.DELIVERED and outcome.attempts == 1, outcome.last_error

        deliver_one()
        [first] = gateway.tokens
        wait_until(lambda: gateway.expired(first), 30, interval=0.1, what="the first token to expire")
        deliver_one()  # renewed before use: the gateway refused nothing
        assert len(gateway.tokens) == 2 and gateway.refused_tokens == 0
        second = [token for token in gateway.tokens if token != first][0]
        wait_until(lambda: gateway.expired(second), 30, interval=0.1, what="the second token to expire")
        gateway.token_lifetime = 600
        deliver_one()
        gateway.revoke_all()  # the cached token is refused: a new one is fetched once, the request sent again
        deliver_one()
        assert len(gateway.tokens) == 4 and gateway.refused_tokens == 1
        assert "refused a cached OAuth2 token (401)" in caplog.text
        assert CLIENT_SECRET not in caplog.text and not any(token in caplog.text for token in gateway.tokens)
        # a client secret the server does not know: permanent, said plainly
        monkeypatch.setenv("TEST_CLIENT_SECRET", "wrong")
        auth["client_id"] = "another-client"
        settings = settings_for(tmp_path, {"kind": "dicomweb", "name": "gateway", "url": f"{gateway.url}/dicom-web",
                                           "auth": auth})
        job = make_outbox(settings.data_dir, results, ["gateway"])
        outcome = attempt_delivery(settings, layout, job).destinations["gateway"]
        assert outcome.state == DeliveryState.DEAD_LETTER and outcome.permanent
        assert "HTTP 401" in outcome.last_error and "invalid_client" in outcome.last_error
    finally:
        gateway.stop()


def test_overloaded_server_is_retried_after_what_it_asks(tmp_path, results, pacs):
    """503 and 429 are retried, no sooner than their Retry-After (seconds, or an HTTP date)."""
    gateway = PacsGateway(pacs.url, (USER, PASSWORD))
    try:
        settings = settings_for(tmp_path, {"kind": "dicomweb", "name": "busy", "url": f"{gateway.url}/dicom-web"})
        layout = DataLayout(settings.data_dir)
        job = make_outbox(settings.data_dir, results, ["busy"])
        start = record_of(settings.data_dir, job).started_at
        gateway.overload(503, "120")
        outcome = attempt_delivery(settings, layout, job, now=start).destinations["busy"]
        assert outcome.state == DeliveryState.PENDING and "HTTP 503" in outcome.last_error
        # the backoff alone would be 1 s at most (times by the database's clock, an attempt later than start)
        assert start + 120 <= outcome.next_attempt_at <= start + 130
        gateway.overload(429, email.utils.formatdate(start + 300, usegmt=True))
        outcome = attempt_delivery(settings, layout, job, now=outcome.next_attempt_at).destinations["busy"]
        assert outcome.state == DeliveryState.PENDING and "HTTP 429" in outcome.last_error
        assert outcome.next_attempt_at >= start + 120 + 170  # about 300 s from now, as the date said
        record = attempt_delivery(settings, layout, job, now=outcome.next_attempt_at)
        assert record.complete and record.destinations["busy"].attempts == 3
        assert [status for _, _, status in gateway.forwarded] == [200]
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, the gateway's certificate for 127.0.0.1, and pacsworker's client certificate."""
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    files = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client = ca.issue_cert("pacsworker.example")
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    server_cert = ca.issue_cert("127.0.0.1")
    files["server_pem"], files["server_key"] = folder / "server.pem", folder / "server.key"
    server_cert.cert_chain_pems[0].write_to_path(str(files["server_pem"]))
    server_cert.private_key_pem.write_to_path(str(files["server_key"]))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    files["server"] = server
    return files


def test_https_with_a_test_ca_and_a_client_certificate(tmp_path, results, pacs, pki):
    gateway = PacsGateway(pacs.url, (USER, PASSWORD), tls=pki["server"])
    try:
        def delivered_with(tls: dict):
            settings = settings_for(tmp_path, {"kind": "dicomweb", "name": "tls", "url": f"{gateway.url}/dicom-web",
                                               "tls": tls})
            job = make_outbox(settings.data_dir, results, ["tls"])
            return attempt_delivery(settings, DataLayout(settings.data_dir), job).destinations["tls"]

        outcome = delivered_with({"ca_bundle": str(pki["ca"]), "client_certificate": str(pki["cert"]),
                                  "client_key": str(pki["key"])})
        assert outcome.state == DeliveryState.DELIVERED, outcome.last_error
        assert len(gateway.forwarded) == 1 and gateway.forwarded[0][2] == 200
        # the test CA is not among the system's: permanent, and says so
        outcome = delivered_with({"client_certificate": str(pki["cert"]), "client_key": str(pki["key"])})
        assert outcome.state == DeliveryState.DEAD_LETTER and outcome.permanent
        assert "TLS certificate is not trusted" in outcome.last_error
        # no client certificate: the gateway ends the handshake; nothing reaches Orthanc
        outcome = delivered_with({"ca_bundle": str(pki["ca"])})
        assert outcome.state != DeliveryState.DELIVERED and "SSLError" in outcome.last_error
        assert len(gateway.forwarded) == 1
    finally:
        gateway.stop()


def test_cstore_over_dicom_tls_with_a_client_certificate(tmp_path, results, pki):
    """C-STORE inside TLS to pacsworker's own receiver, which requires a certificate of the test CA."""
    from pacsworker.scp.server import Receiver

    scp = Settings(
        scp={"host": "127.0.0.1", "port": free_port(), "plain": False, "series_quiet_seconds": 60,
             "tls": {"port": free_port(), "certificate": str(pki["server_pem"]), "private_key": str(pki["server_key"]),
                     "ca_certificates": str(pki["ca"]), "require_client_certificate": True}},
        storage={"data_dir": str(tmp_path / "receiver")},
    )
    receiver = Receiver(scp, lambda record: None)
    receiver.start()
    try:
        tls = {"ca_bundle": str(pki["ca"]), "client_certificate": str(pki["cert"]), "client_key": str(pki["key"])}
        settings = settings_for(tmp_path, {"kind": "dimse", "name": "tls-dimse", "host": "127.0.0.1",
                                           "port": scp.scp.tls.port, "ae_title": "PACSWORKER", "tls": tls})
        job = make_outbox(settings.data_dir, results, ["tls-dimse"])
        outcome = attempt_delivery(settings, DataLayout(settings.data_dir), job).destinations["tls-dimse"]
        assert outcome.state == DeliveryState.DELIVERED, outcome.last_error
        spooled = {path.stem for path in (tmp_path / "receiver" / "spool").rglob("*.dcm")}
        assert set(uids_of(settings.data_dir, job).values()) <= spooled
    finally:
        receiver.stop()


def test_recovery_sweep_resends_overdue_deliveries_only(tmp_path):
    from pacsworker.tasks.app import configure
    from pacsworker.tasks.submit import recover

    # queue settings of its own: configure() drops its broker connections only when they differ, and the
    # next test that configures this process must not publish into this test's broker folder
    settings = Settings(storage={"data_dir": str(tmp_path / "data")},
                        queue={"stale_after_seconds": 60, "publish_timeout_seconds": 1.75})
    configure(settings)
    layout = DataLayout(settings.data_dir).create()
    ledger = ledger_of(settings.data_dir)
    for job_id in ("lost", "waiting", "dead", "done"):
        _delivering(settings.data_dir, job_id, {"seg.dcm": "1.2.3.4"}, ["pacs"])
    ledger.record_attempt("dead", "pacs", {}, {"seg.dcm": "refused"}, error="refused", permanent=True)
    ledger.record_attempt("done", "pacs", {"seg.dcm": "stored"}, {})
    _pass_time(settings.data_dir, "lost", 61)  # its message was lost a stale period ago
    _pass_time(settings.data_dir, "waiting", 30)
    messages = lambda: len(list(layout.broker.glob("*.msg")))  # noqa: E731
    assert recover(settings) == 1 and messages() == 1  # only the one whose message was lost
    assert recover(settings) == 0  # not again before another stale period
    record = record_of(settings.data_dir, "lost")
    assert record.next_attempt_at > ledger.now() + 50 and record.task_id
    # the new message is in charge: the lost one, should it turn up after all, does nothing
    with pytest.raises(Superseded):
        attempt_delivery(settings, layout, "lost", task_id="the-lost-message")
    assert record_of(settings.data_dir, "lost") == record


# --- how answers are read, and the settings ------------------------------------------------------


def _item(uid: str, **attrs) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    item.ReferencedSOPInstanceUID = uid
    for key, value in attrs.items():
        setattr(item, key, value)
    return item


def test_store_response_is_read_instance_by_instance():
    paths = {uid: Path(f"{uid}.dcm") for uid in ("1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7")}
    response = pydicom.Dataset()
    response.ReferencedSOPSequence = [_item("1.1"), _item("1.2", WarningReason=0xB000)]
    response.FailedSOPSequence = [_item("1.3", FailureReason=0xA700), _item("1.4", FailureReason=0xC000),
                                  _item("1.5", FailureReason=0xB00E), _item("1.6", FailureReason=0x0110)]
    verdicts = {r.path.stem: (r.verdict, r.detail) for r in read_store_response(response, paths)}
    assert verdicts == {
        "1.1": (Verdict.STORED, "stored"),
        "1.2": (Verdict.STORED, "stored with warning 0xB000: coercion of data elements"),
        "1.3": (Verdict.RETRYABLE, "refused 0xA700: out of resources"),
        "1.4": (Verdict.PERMANENT, "refused 0xC000: cannot understand"),
        "1.5": (Verdict.STORED, "already stored (0xB00E)"),
        "1.6": (Verdict.RETRYABLE, "refused 0x0110: processing failure"),
        "1.7": (Verdict.RETRYABLE, "not named in the STOW-RS response"),
    }
    assert {v for v, _ in (status_verdict(code) for code in (0x0000, 0xB000, 0xB006, 0xB007, 0x0111))} == {Verdict.STORED}
    assert status_verdict(0xA702)[0] == Verdict.RETRYABLE
    assert status_verdict(0xA900)[0] == status_verdict(0xC000)[0] == status_verdict(0x0122)[0] == Verdict.PERMANENT


def test_backoff_doubles_with_jitter_up_to_its_cap(tmp_path):
    settings = settings_for(tmp_path, backoff_base_seconds=5, backoff_max_seconds=60)
    for attempts, ceiling in ((1, 5), (2, 10), (3, 20), (5, 60), (40, 60)):
        waits = {backoff_seconds(settings, attempts) for _ in range(50)}
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits) and len(waits) > 1
    assert backoff_seconds(settings, 1, retry_after=120) == 120


def test_destination_settings(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        "models: [{name: ct-body, destinations: [pacs]}, {name: other, kind: builtin, source: ct-body}]\n"
        "queue: {delivery_backoff_seconds: 2}\n"
        "destinations:\n"
        "  - {kind: dicomweb, name: pacs, url: 'https://pacs/dicom-web', auth: {username: u, password_env: P},\n"
        "     tls: {ca_bundle: /etc/ca.pem}}\n"
        "  - {kind: dimse, name: archive, host: archive, port: 104, ae_title: ARCHIVE}\n"
        "  - {kind: folder, name: copy, path: /srv/results}\n"
    )
    settings = load_settings(path)
    assert [d.name for d in settings.effective_destinations("ct-body")] == ["pacs"]
    assert [d.name for d in settings.effective_destinations("other")] == ["pacs", "archive", "copy"]
    assert settings.destinations[0].auth.kind == "basic" and settings.delivery.backoff_base_seconds == 2
    assert settings.delivery.max_age_seconds == 86400
    for text, message in (
        ("destinations: [{kind: dicomweb, url: 'http://x', auth: {kind: basic, username: u, password: hunter2}}]",
         "password may not be written in the configuration"),
        ("destinations: [{kind: dicomweb, url: 'http://x', auth: {kind: bearer}}]", "exactly one of token_env"),
        ("destinations: [{kind: dimse, host: h, ae_title: A}, {kind: dimse, host: g, ae_title: B}]", "unique"),
        ("models: [{name: m, destinations: [nowhere]}]", "which no destination is named"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_settings(path)
        assert "hunter2" not in str(err.value)
    assert os.environ.get("P") is None  # secrets are read when sending, not when loading
