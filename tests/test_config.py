"""Settings: YAML file, env overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from pacsworker.config import ConfigError, load_settings


def test_defaults_run_without_redis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.scp.ae_title, settings.scp.port, settings.scp.series_quiet_seconds) == ("PACSWORKER", 11112, 10)
    assert settings.queue.broker_url == ""  # embedded broker
    assert [m.name for m in settings.models] == ["ct-body", "mr-brain"]  # the brain extra is installed by the README commands
    assert settings.models[0].match.min_instances == 10
    [folder] = settings.effective_destinations()
    assert folder.kind == "folder" and folder.path == tmp_path / "data" / "results"


def test_yaml_and_env_override(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        "scp: {port: 104, allowed_calling_aets: [CT1]}\n"
        "destinations:\n  - {kind: dicomweb, url: 'http://pacs/dicom-web', auth: {username: u, password_env: PACS_PASSWORD}}\n"
    )
    monkeypatch.setenv("PACSWORKER__SCP__PORT", "4242")
    settings = load_settings(path)
    assert settings.scp.port == 4242 and settings.scp.allowed_calling_aets == ["CT1"]
    assert settings.destinations[0].auth.username == "u"


@pytest.mark.parametrize(
    "text, key",
    [
        ("scp: {port: 70000}", "scp.port"),
        ("scp: {ae_title: 'A_TITLE_LONGER_THAN_16'}", "scp.ae_title"),
        ("queue: {job_soft_time_limit: 100, job_time_limit: 50}", "queue"),
        ("destinations: [{kind: dicomweb, url: 'ftp://x'}]", "destinations.0.dicomweb.url"),
        ("destinations: [{kind: carrier-pigeon}]", "destinations.0"),
        ("scpp: {}", "scpp"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"  {key}" in str(err.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
