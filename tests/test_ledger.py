"""The ledger on SQLite and on a real PostgreSQL: transitions by compare-and-set, one clock (the
database's), counts that add up under eight processes, queries by index, no patient data, and the
refusal of SQLite on a network file system."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import inspect, select

from pacsworker.ledger import Ledger, LedgerError, NewJob, SeriesFacts, default_url, migrate, refuse_network_filesystem
from pacsworker.ledger.database import filesystem_of, normalise_url
from pacsworker.ledger.schema import events, metadata
from pacsworker.scp.routing import series_facts

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return default_url(tmp_path / "data")
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def ledger(ledger_url):
    with Ledger.open(ledger_url, actor="testhost/scp/PACSWORKER") as opened:
        yield opened


def series_uid(n: int) -> str:
    return f"{STUDY}.{n}"


def received(ledger: Ledger, n: int, instances: int = 3, model: str = "ct-body") -> str:
    """A series of ``instances`` instances received, completed and routed to one job; returns the job id."""
    uid = series_uid(n)
    for _ in range(instances):
        ledger.record_instance(SeriesFacts(uid, STUDY, modality="CT", calling_aet="MODALITY"))
    assert ledger.complete_series(uid, instances=instances, frames=instances, content_digest=f"d{n}",
                                  completed_by="quiet for 5 s")
    job_id = f"{model}_{uid}_d{n}"
    sops = [f"{uid}.{i}" for i in range(1, instances + 1)]
    assert ledger.route_series(uid, [NewJob(job_id, uid, STUDY, model, {uid: sops})]) == [job_id]
    return job_id


def test_migrations_upgrade_an_empty_database_to_the_schema_the_code_uses(ledger):
    with ledger.engine.connect() as conn:
        assert migrate.current(conn) == migrate.head() == migrate.HEAD != ""  # HEAD: the check at every open
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert set(inspect(conn).get_table_names()) >= {"series", "studies", "jobs", "job_inputs", "job_series",
                                                        "deliveries", "delivery_instances", "receivers", "events",
                                                        "counters"}
    Ledger.open(str(ledger.engine.url.render_as_string(hide_password=False))).close()  # opening again: a no-op


def test_a_series_from_its_first_instance_to_delivered_results(ledger):
    job_id = received(ledger, 1, instances=3)
    series = ledger.series(series_uid(1))
    assert (series.state, series.instances, series.calling_aet) == ("queued", 3, "MODALITY")
    assert ledger.job_inputs(job_id) == {series_uid(1): [f"{series_uid(1)}.{i}" for i in (1, 2, 3)]}
    assert [j.job_id for j in ledger.jobs_to_send(stale_after=60)] == [job_id]  # made, not yet sent
    assert ledger.mark_sent(job_id)
    assert ledger.jobs_to_send(stale_after=60) == []
    claim = ledger.claim_job(job_id, "gpu1:100", max_attempts=3, stale_after=60)
    assert claim.won and claim.job.attempts == 1 and claim.job.worker == "gpu1:100"
    assert ledger.heartbeat(job_id, "gpu1:100", 1, stage="model")
    assert ledger.job(job_id).stage == "model"
    assert ledger.finish_job(job_id, "gpu1:100", 1, "delivering", outputs={"sr": "2.25.1", "sr_series": "2.25.2"},
                             results={"seg.dcm": "2.25.3", "sr.dcm": "2.25.1"}, destinations=["pacs", "archive"])
    assert ledger.series(series_uid(1)).state == "queued"  # results still in the outbox
    assert ledger.record_attempt(job_id, "pacs", {"seg.dcm": "stored", "sr.dcm": "stored"}, {}) == "delivered"
    assert ledger.record_attempt(job_id, "archive", {"seg.dcm": "stored"}, {"sr.dcm": "timed out"},
                                 error="timed out", retry_in=30) == "pending"
    assert ledger.job(job_id).state == "delivering"
    assert ledger.record_attempt(job_id, "archive", {"sr.dcm": "stored"}, {}) == "delivered"
    assert (ledger.job(job_id).state, ledger.series(series_uid(1)).state) == ("done", "done")
    kinds = [e.kind for e in reversed(ledger.history(series_uid=series_uid(1)))]
    assert kinds == ["received", "completed", "queued", "routed", "sent", "started", "finished", "delivered",
                     "delivered"]
    assert ledger.counts() == {"series": {"": {"done": 1}}, "job": {"ct-body": {"done": 1}},
                               "delivery": {"pacs": {"delivered": 1}, "archive": {"delivered": 1}}}


def test_a_transition_from_a_state_the_row_is_not_in_changes_nothing(ledger):
    job_id = received(ledger, 2)
    assert not ledger.complete_series(series_uid(2), instances=1, frames=1, content_digest="x", completed_by="again")
    assert ledger.route_series(series_uid(2), []) is None  # routed already
    assert not ledger.finish_job(job_id, "gpu1:1", 1, "done")  # never claimed
    assert ledger.claim_job(job_id, "gpu1:1", 3, 60).won
    assert not ledger.finish_job(job_id, "gpu2:2", 1, "done")  # another worker's attempt
    assert not ledger.heartbeat(job_id, "gpu1:1", 2)  # not this attempt
    assert not ledger.mark_sent(job_id)  # running, not queued
    assert not ledger.retry_job(job_id)  # it has not ended badly
    assert ledger.finish_job(job_id, "gpu1:1", 1, "failed", reason="model raised")
    assert ledger.series(series_uid(2)).state == "failed"
    assert ledger.retry_job(job_id, operator="ops")
    assert (ledger.job(job_id).state, ledger.job(job_id).attempts, ledger.series(series_uid(2)).state) == \
        ("queued", 0, "queued")
    with pytest.raises(ValueError, match="not how a job ends"):
        ledger.finish_job(job_id, "gpu1:1", 1, "queued")


def test_a_series_received_again_is_routed_again_and_a_resend_makes_no_new_job(ledger):
    job_id = received(ledger, 3)
    uid = series_uid(3)
    assert ledger.record_instance(SeriesFacts(uid, STUDY, modality="CT")) == "reopened"
    assert ledger.series(uid).state == "receiving"
    ledger.complete_series(uid, instances=3, frames=3, content_digest="d3", completed_by="quiet")
    same = NewJob(job_id, uid, STUDY, "ct-body", {uid: [f"{uid}.1"]})
    assert ledger.route_series(uid, [same]) == []  # the same content: the job stands, nothing to send
    assert ledger.counts()["job"] == {"ct-body": {"queued": 1}}


def test_two_workers_claiming_one_job_exactly_one_wins(ledger_url):
    first, second = Ledger.open(ledger_url), Ledger.open(ledger_url)
    job_ids = [received(first, 100 + n) for n in range(10)]
    for job_id in job_ids:
        barrier, wins = threading.Barrier(2), []

        def claim(ledger: Ledger, worker: str, job_id: str = job_id, barrier=barrier, wins=wins) -> None:
            barrier.wait()
            if ledger.claim_job(job_id, worker, 3, 60).won:
                wins.append(worker)

        threads = [threading.Thread(target=claim, args=(ledger, name)) for ledger, name in ((first, "a"), (second, "b"))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1, wins
        assert first.job(job_id).worker == wins[0] and first.job(job_id).attempts == 1
    first.close()
    second.close()


def _hammer(url: str, worker: str, job_ids: list[str], series: str, seed: int, queue) -> None:
    """One of eight processes: claim every job it can, finish what it won; count instances of one series."""
    ledger = Ledger.open(url, actor=worker)
    won = []
    rng = random.Random(seed)
    for job_id in rng.sample(job_ids, len(job_ids)):
        if ledger.claim_job(job_id, worker, 3, 3600).won:
            assert ledger.heartbeat(job_id, worker, 1, stage="model")
            assert ledger.finish_job(job_id, worker, 1, "no-result", reason="not a volume")
            won.append(job_id)
        ledger.record_instance(SeriesFacts(series, STUDY, modality="CR"))
    ledger.close()
    queue.put(won)


def test_eight_processes_hammering_transitions_lose_no_update(ledger_url):
    ledger = Ledger.open(ledger_url)
    job_ids = [received(ledger, 200 + n, instances=1) for n in range(40)]
    counted = series_uid(999)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_hammer, args=(ledger_url, f"w{i}", job_ids, counted, i, queue)) for i in range(8)]
    [p.start() for p in procs]
    results = [queue.get(timeout=300) for _ in procs]
    [p.join(timeout=60) for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    won = [job_id for result in results for job_id in result]
    assert sorted(won) == sorted(job_ids)  # each job claimed exactly once
    assert all(ledger.job(job_id).attempts == 1 for job_id in job_ids)
    assert ledger.series(counted).instances == 8 * len(job_ids)  # no increment lost
    assert ledger.counts()["job"] == {"ct-body": {"no-result": 40}}
    assert ledger.state_counts("series") == {"no-result": 40, "receiving": 1}
    started = [e for e in ledger.history(limit=10_000) if e.kind == "started"]
    assert len(started) == 40
    before = ledger.counts()
    ledger.recount()  # the counters the transitions kept equal a count of the rows
    assert ledger.counts() == before
    ledger.close()


def test_a_silent_worker_is_found_by_the_database_clock_not_the_callers(ledger, monkeypatch):
    job_id = received(ledger, 4)
    assert ledger.claim_job(job_id, "gpu1:1", 3, stale_after=0.5).won
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # this host's clock far ahead: no matter
    assert ledger.requeue_stale(stale_after=0.5) == []
    assert not ledger.claim_job(job_id, "gpu2:2", 3, stale_after=0.5).won  # still beating by the database
    monkeypatch.undo()
    time.sleep(0.8)
    assert ledger.requeue_stale(stale_after=0.5) == [job_id]
    assert ledger.job(job_id).state == "queued" and ledger.job(job_id).sent_at == 0
    assert [j.job_id for j in ledger.jobs_to_send(stale_after=60)] == [job_id]
    assert not ledger.heartbeat(job_id, "gpu1:1", 1)  # the silent worker's late beat is refused
    claim = ledger.claim_job(job_id, "gpu2:2", 3, stale_after=0.5)
    assert claim.won and claim.job.attempts == 2
    assert not ledger.finish_job(job_id, "gpu1:1", 1, "done")  # the first attempt's results are dropped
    assert [e.kind for e in ledger.history(job_id=job_id)][:2] == ["started", "requeued"]


def test_a_job_sent_but_never_started_is_due_again_whatever_the_broker_said(ledger):
    job_id = received(ledger, 5)
    assert ledger.mark_sent(job_id)
    assert ledger.jobs_to_send(stale_after=0.3) == []
    time.sleep(0.5)
    assert [j.job_id for j in ledger.jobs_to_send(stale_after=0.3)] == [job_id]


def test_a_job_out_of_attempts_fails_instead_of_running_again(ledger):
    job_id = received(ledger, 6)
    for attempt in (1, 2):
        assert ledger.claim_job(job_id, f"w{attempt}", max_attempts=2, stale_after=0).won
        time.sleep(0.05)
        assert ledger.requeue_stale(stale_after=0) == [job_id]
    claim = ledger.claim_job(job_id, "w3", max_attempts=2, stale_after=0)
    assert (claim.won, claim.state) == (False, "failed")
    assert "gave up after 2 attempts" in ledger.job(job_id).reason
    assert ledger.series(series_uid(6)).state == "failed"


def test_dead_letters_and_their_retry(ledger):
    job_id = received(ledger, 7)
    ledger.claim_job(job_id, "w", 3, 60)
    ledger.finish_job(job_id, "w", 1, "delivering", results={"sr.dcm": "2.25.9"}, destinations=["pacs"])
    assert ledger.take_delivery(job_id, "task-1") and not ledger.take_delivery(job_id, "task-2")
    assert ledger.record_attempt(job_id, "pacs", {}, {"sr.dcm": "401"}, error="401 Unauthorized",
                                 permanent=True) == "dead-letter"
    [letter] = ledger.dead_letters()
    assert (letter.job_id, letter.permanent, letter.last_error) == (job_id, True, "401 Unauthorized")
    assert ledger.job(job_id).state == "failed" and ledger.series(series_uid(7)).state == "failed"
    names, task_id = ledger.retry_delivery(job_id, operator="ops")
    assert names == ["pacs"] and ledger.take_delivery(job_id, task_id) and not ledger.take_delivery(job_id, "task-1")
    assert ledger.dead_letters() == [] and ledger.job(job_id).state == "delivering"
    time.sleep(0.05)
    assert ledger.record_attempt(job_id, "pacs", {}, {"sr.dcm": "503"}, error="503", max_age=0.01, retry_in=1) \
        == "dead-letter"  # max age passed (database clock): given up
    assert ledger.counts()["delivery"] == {"pacs": {"dead-letter": 1}}


def test_an_overdue_delivery_is_handed_to_a_new_message(ledger):
    job_id = received(ledger, 8)
    ledger.claim_job(job_id, "w", 3, 60)
    ledger.finish_job(job_id, "w", 1, "delivering", results={"sr.dcm": "2.25.9"}, destinations=["pacs"])
    ledger.take_delivery(job_id, "lost")
    time.sleep(0.4)
    assert ledger.deliveries_overdue(stale_after=0.2) == [job_id]
    task_id = ledger.hand_over(job_id, stale_after=0.2)
    assert task_id and ledger.take_delivery(job_id, task_id) and not ledger.take_delivery(job_id, "lost")
    assert ledger.deliveries_overdue(stale_after=0.2) == []  # not again before another stale time


def test_the_earlier_result_of_a_series_and_model(ledger):
    uid = series_uid(9)
    first = received(ledger, 9)
    ledger.claim_job(first, "w", 3, 60)
    ledger.finish_job(first, "w", 1, "delivering", outputs={"sr": "2.25.10", "sr_series": "2.25.11"},
                      results={"sr.dcm": "2.25.10"}, destinations=["pacs"])
    ledger.record_instance(SeriesFacts(uid, STUDY))
    ledger.complete_series(uid, instances=4, frames=4, content_digest="e9", completed_by="quiet")
    second = f"ct-body_{uid}_e9"
    assert ledger.route_series(uid, [NewJob(second, uid, STUDY, "ct-body", {uid: [f"{uid}.4"]})]) == [second]
    assert [j.job_id for j in ledger.jobs_of_series(uid)] == [second]
    assert [j.job_id for j in ledger.jobs_of_series(uid, current=False)] == [first]
    [earlier] = ledger.earlier_results(ledger.job(second))
    assert earlier.job_id == first and earlier.outputs["sr"] == "2.25.10"
    assert ledger.earlier_results(ledger.job(first)) == []  # the second made nothing yet


def test_study_jobs_wait_for_a_quiet_study(ledger):
    uids = [series_uid(20), series_uid(21)]
    for n, uid in enumerate(uids):
        ledger.record_instance(SeriesFacts(uid, STUDY, modality="MR"))
        ledger.complete_series(uid, instances=1, frames=1, content_digest=f"s{n}", completed_by="quiet")
        assert ledger.route_series(uid, [], study_models=["brain"]) == []
    assert ledger.series(uids[0]).state == "queued" and ledger.study(STUDY).members == {uids[0]: "s0", uids[1]: "s1"}
    assert ledger.studies_due(quiet_seconds=60) == []
    [due] = ledger.studies_due(quiet_seconds=0)
    job = NewJob(f"brain_study_{STUDY}", uids[0], STUDY, "brain", {uid: [f"{uid}.1"] for uid in uids}, scope="study")
    assert ledger.route_study(due.study_uid, [job]) == [job.job_id]
    assert ledger.route_study(due.study_uid, [job]) is None  # not waiting any more
    assert [j.job_id for j in ledger.jobs_of_series(uids[1])] == [job.job_id]
    ledger.claim_job(job.job_id, "w", 3, 60)
    ledger.finish_job(job.job_id, "w", 1, "no-result", reason="nothing found")
    assert {ledger.series(uid).state for uid in uids} == {"no-result"}


def test_status_queries_page_through_the_latest_by_keyset(ledger):
    for n in range(30, 37):
        received(ledger, n, instances=1)
    page = ledger.latest_series(limit=3)
    assert [s.series_uid for s in page] == [series_uid(n) for n in (36, 35, 34)]
    after = ledger.latest_series(limit=3, before=(page[-1].last_seen, page[-1].series_uid))
    assert [s.series_uid for s in after] == [series_uid(n) for n in (33, 32, 31)]
    jobs = ledger.latest_jobs(limit=4)
    more = ledger.latest_jobs(limit=4, before=(jobs[-1].queued_at, jobs[-1].job_id))
    assert len(jobs) == 4 and len(more) == 3 and not {j.job_id for j in jobs} & {j.job_id for j in more}
    assert len(ledger.jobs_in_state("queued")) == 7 and ledger.series_in_state("receiving") == []
    ledger.receiver_heartbeat("scp1:11112", host="scp1", pid=1, ae_title="PACSWORKER", ports={"dimse": 11112},
                              receiving={series_uid(40): 3}, started=True)
    [(receiver, ago)] = ledger.receivers()
    assert receiver.receiving == {series_uid(40): 3} and 0 <= ago < 5


def test_no_patient_data_reaches_the_ledger(ledger, ledger_url):
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-4711", "19700101"
    ds.BodyPartExamined, ds.SeriesDescription, ds.ImageType = "CHEST", "Thorax 1mm", ["ORIGINAL", "PRIMARY"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    uid = series_uid(50)
    ledger.record_instance(SeriesFacts(uid, STUDY, modality="CT", facts=series_facts(ds)))
    with pytest.raises(ValueError, match="not routing facts"):
        SeriesFacts(uid, STUDY, facts={**series_facts(ds), "patient_name": str(ds.PatientName)})
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        SeriesFacts("Doe^Jane", STUDY)
    with pytest.raises(TypeError):
        SeriesFacts(uid, STUDY, patient_name="Doe^Jane")  # type: ignore[call-arg]
    ledger.complete_series(uid, instances=1, frames=1, content_digest="p", completed_by="quiet")
    ledger.skip_series(uid, "no model matches")
    with ledger.engine.connect() as conn:
        dump = repr([conn.execute(select(table)).all() for table in metadata.sorted_tables])
        history = repr(conn.execute(select(events)).all())
    assert "CHEST" in dump and "Doe" not in dump and "MRN-4711" not in dump and "19700101" not in dump
    assert "Thorax" not in history  # the history holds identifiers, states, counts and reasons only
    assert pydicom.uid.UID(uid).is_valid


def test_postgresql_urls_mean_psycopg_and_other_databases_are_refused():
    assert normalise_url("postgresql://u@db/pacsworker").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@db/pacsworker").drivername == "postgresql+psycopg"
    assert normalise_url("sqlite:////var/lib/pacsworker/ledger.sqlite3").drivername == "sqlite"
    with pytest.raises(LedgerError, match="postgresql://"):
        normalise_url("mysql://u@db/pacsworker")
    with pytest.raises(LedgerError, match="psycopg 3"):
        normalise_url("postgresql+psycopg2://u@db/pacsworker")


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
40 22 0:50 / /srv/pacs rw,relatime - nfs4 fileserver:/export/pacs rw,vers=4.2
41 22 0:51 / /srv/local\\040disk rw,relatime - ext4 /dev/sdb1 rw
42 40 0:52 / /srv/pacs/scratch rw,relatime - xfs /dev/sdc1 rw
"""


def test_a_sqlite_ledger_on_a_network_file_system_is_refused_with_the_fix(tmp_path):
    share = tmp_path / "srv" / "pacs"
    with pytest.raises(LedgerError) as refused:
        refuse_network_filesystem(share / "data", MOUNTINFO.replace("/srv/pacs", str(share)))
    message = str(refused.value)
    assert "nfs4" in message and "srv/pacs" in message and "storage.database_url: postgresql://" in message
    assert filesystem_of(Path("/srv/pacs/scratch/data"), MOUNTINFO) == ("xfs", "/srv/pacs/scratch")
    assert filesystem_of(Path("/srv/local disk/data"), MOUNTINFO) == ("ext4", "/srv/local disk")
    refuse_network_filesystem(tmp_path, MOUNTINFO)  # on the overlay root: fine
    for fstype in ("cifs", "smb3", "fuse.sshfs", "ceph", "9p"):
        with pytest.raises(LedgerError, match=fstype):
            refuse_network_filesystem(tmp_path, f"22 1 0:21 / / rw - {fstype} server:/x rw\n")


def test_history_is_trimmed_by_age(ledger):
    received(ledger, 60)
    assert ledger.trim_history(older_than_seconds=3600) == 0
    time.sleep(0.2)
    removed = ledger.trim_history(older_than_seconds=0.1)
    assert removed >= 4 and ledger.history(series_uid=series_uid(60)) == []
    assert ledger.series(series_uid(60)).state == "queued"  # the state stays; only its history goes
