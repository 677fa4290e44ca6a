"""What an operator reads from the ledger besides ``status``: ``pacsworker history`` (events, newest
first), ``pacsworker jobs show``, the status page a page at a time (keyset, "older" links) and the
/metrics gauges; all through the one query layer (``pacsworker.ledger.views``)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from ledger_fill import age, deliver, fail_delivery, routed, run
from pacsworker.cli import app
from pacsworker.config import CONFIG_ENV, Settings
from pacsworker.ledger import Ledger, close_ledgers, default_url
from pacsworker.ledger.views import gauges, page_view, status_report

STUDY = "1.2.826.0.1.3680043.8.498.5"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.6"
RESULTS = {"seg.dcm": f"{STUDY}.900.1", "sr.dcm": f"{STUDY}.900.2"}


@pytest.fixture
def filled(tmp_path, monkeypatch):
    """A ledger with a series delivered to one destination and dead-lettered at another, and one of
    another study that failed; its configuration file."""
    monkeypatch.setenv(CONFIG_ENV, "")
    data = tmp_path / "data"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(data)}}))
    with Ledger.open(default_url(data), actor="host1/worker") as ledger:
        [job] = routed(ledger, f"{STUDY}.1", STUDY, ["ct-body"], instances=4)
        run(ledger, job, "delivering", values={"segments": {"Liver": {"volume_ml": 1500.0}}}, results=RESULTS,
            destinations=["archive", "pacs"])
        deliver(ledger, job, "pacs", RESULTS)
        fail_delivery(ledger, job, "archive", RESULTS, "HTTP 401 credentials refused", permanent=True)
        [other] = routed(ledger, f"{OTHER_STUDY}.1", OTHER_STUDY, ["ct-body"])
        run(ledger, other, "failed", reason="model ct-body failed: boom")
    yield config, data, job, other
    close_ledgers()


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_history_of_a_series_its_study_or_a_job_newest_first(filled):
    config, _, job, other = filled
    events = json.loads(cli("history", "--series", f"{STUDY}.1", "--json", "--config", str(config)))
    kinds = [e["kind"] for e in events]
    assert kinds == ["dead-lettered", "delivered", "finished", "started", "sent", "routed", "queued", "completed",
                     "received"], "the series' events and its job's, newest first"
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    dead = events[0]
    assert dead["destination"] == "archive" and dead["reason"] == "HTTP 401 credentials refused"
    assert events[-1]["count"] == 1 and events[-1]["actor"] == "host1/worker"
    by_job = json.loads(cli("history", "--job", other, "--json", "--config", str(config)))
    assert [e["kind"] for e in by_job] == ["finished", "started", "sent", "queued"]
    assert by_job[0]["state"] == "failed" and by_job[0]["reason"] == "model ct-body failed: boom"
    by_study = json.loads(cli("history", "--study", OTHER_STUDY, "--json", "--config", str(config)))
    assert {e["study_uid"] for e in by_study} == {OTHER_STUDY} and "received" in [e["kind"] for e in by_study]
    table = " ".join(cli("history", "--series", f"{STUDY}.1", "--config", str(config)).split())
    assert "dead-lettered" in table and "HTTP 401 credentials refused" in table and "newest first" in table


def test_history_since_leaves_out_older_events(filled):
    config, data, _, other = filled
    with Ledger.open(default_url(data)) as ledger:
        age(ledger, 3 * 3600, all_events=True)
        assert ledger.retry_job(other, operator="alice")
    events = json.loads(cli("history", "--since", "2h", "--json", "--config", str(config)))
    assert [(e["kind"], e["job_id"], e["actor"]) for e in events] == [("retried", other, "alice")]
    assert len(json.loads(cli("history", "--since", "4h", "--json", "--config", str(config)))) > 10


def test_history_needs_to_know_whose(filled):
    config = filled[0]
    result = CliRunner().invoke(app, ["history", "--config", str(config)])
    assert result.exit_code == 2 and "--study UID, --series UID, --job ID or --since AGE" in result.output
    result = CliRunner().invoke(app, ["history", "--since", "soon", "--config", str(config)])
    assert result.exit_code == 2 and "--since" in result.output


def test_jobs_show_gives_the_job_its_inputs_deliveries_and_events(filled):
    config, _, job, _ = filled
    shown = json.loads(cli("jobs", "show", job, "--json", "--config", str(config)))
    assert shown["job"]["state"] == "failed" and "deliveries retry" in shown["job"]["reason"]
    assert shown["inputs"] == {"count": 4, "series": {f"{STUDY}.1": [f"{STUDY}.1.{n}" for n in (1, 2, 3, 4)]}}
    archive, pacs = shown["deliveries"]
    assert (archive["destination"], archive["state"], archive["permanent"]) == ("archive", "dead-letter", True)
    assert {i["sop_instance_uid"] for i in archive["instances"].values()} == set(RESULTS.values())
    assert pacs["state"] == "delivered" and {i["state"] for i in pacs["instances"].values()} == {"delivered"}
    assert [e["kind"] for e in shown["events"]][:2] == ["dead-lettered", "delivered"]
    table = " ".join(cli("jobs", "show", job, "--config", str(config)).split())
    assert "4 instance(s) of" in table and "Liver 1500 mL" in table and "dead-letter after 1 attempt(s)" in table
    result = CliRunner().invoke(app, ["jobs", "show", "no-such-job", "--config", str(config)])
    assert result.exit_code == 1 and "no job no-such-job" in result.output


def test_status_page_and_metrics_read_the_same_counts_and_page_by_keyset(tmp_path):
    with Ledger.open(default_url(tmp_path / "data")) as ledger:
        jobs = []
        for n in range(1, 8):
            jobs += routed(ledger, f"{STUDY}.{n}", STUDY, ["ct-body"])
        for job in jobs[:3]:
            run(ledger, job, "no-result", reason="nothing found")
        first = page_view(ledger, limit=3)
        assert [s.series_uid for s in first.series] == [f"{STUDY}.{n}" for n in (7, 6, 5)]
        assert first.series_total == 7 and first.older_series == (first.series[-1].last_seen, f"{STUDY}.5")
        second = page_view(ledger, limit=3, series_before=first.older_series, jobs_before=first.older_jobs)
        third = page_view(ledger, limit=3, series_before=second.older_series, jobs_before=second.older_jobs)
        assert [s.series_uid for s in second.series + third.series] == [f"{STUDY}.{n}" for n in (4, 3, 2, 1)]
        assert third.older_series is None and len({j.job_id for j in first.jobs + second.jobs + third.jobs}) == 7
        counted = gauges(ledger)
        report = status_report(ledger, {})
        assert counted.series == report["series"] == {"queued": 4, "no-result": 3}
        assert counted.jobs == {("ct-body", "queued"): 4, ("ct-body", "no-result"): 3}
        assert sum(counted.jobs.values()) == sum(report["jobs"].values()) == first.jobs_total
        assert counted.deliveries == {"pending": 0, "dead-letter": 0}

    from pacsworker.ops_http import page

    try:
        settings = Settings(storage={"data_dir": str(tmp_path / "data")})
        html = page(settings, "serve")
        assert "Series (latest 7 of 7)" in html and "older series" not in html
        import pacsworker.ops_http as ops

        ops.RECENT, saved = 3, ops.RECENT
        try:
            html = page(settings, "serve")
            link = re.search(r"<a id='older-series' href='\?([^']+)'>", html).group(1).replace("&amp;", "&")
            older = page(settings, "serve", link)
        finally:
            ops.RECENT = saved
        assert "Series (latest 3 of 7)" in html and "Series (older 3 of 7)" in older
        assert f"<td>{STUDY}.4</td>" in older and f"<td>{STUDY}.7</td>" not in older
        assert "http-equiv='refresh'" not in older  # an older page stays where the operator put it
    finally:
        close_ledgers()


def test_metrics_gauges_come_from_the_ledger(filled):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pacsworker.metrics import RecordsCollector

    _, data, _, _ = filled
    registry = CollectorRegistry()
    registry.register(RecordsCollector(Settings(storage={"data_dir": str(data)}), 0))
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(generate_latest(registry).decode()) for s in family.samples}
    assert values[("pacsworker_jobs", (("model", "ct-body"), ("state", "failed")))] == 2
    assert values[("pacsworker_series", (("state", "failed"),))] == 2
    assert values[("pacsworker_outbox_destinations", (("state", "dead-letter"),))] == 1
    assert values[("pacsworker_outbox_destinations", (("state", "pending"),))] == 0
