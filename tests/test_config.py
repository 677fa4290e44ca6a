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


# --- nothing silently wrong: unknown keys, kinds, the environment, YAML syntax ------------------------

@pytest.mark.parametrize(
    "text, line",
    [
        ("scp: {prot: 104}", "scp.prot: unknown key; did you mean `port`?"),
        ("series_quiet_secs: 5", "series_quiet_secs: unknown key; did you mean `scp.series_quiet_seconds`?"),
        ("queue: {broker_ulr: 'redis://x'}", "queue.broker_ulr: unknown key; did you mean `broker_url`?"),
        ("storage: {data_dri: /x}", "storage.data_dri: unknown key; did you mean `data_dir`?"),
        ("metrics: {prot: 9100}", "metrics.prot: unknown key; did you mean `port`?"),
        ("logging: {levle: INFO}", "logging.levle: unknown key; did you mean `level`?"),
        ("models: [{name: ct-body, mtach: {modalities: [CT]}}]",
         "models.0 (ct-body).mtach: unknown key; did you mean `match`?"),
        ("models: [{name: ct-body, option: {a: 1}}]", "models.0 (ct-body).option: unknown key; did you mean `options`?"),
        ("models: [{name: ct-body, match: {modalites: [CT]}}]",
         "models.0 (ct-body).match.modalites: unknown key; did you mean `modalities`?"),
        ("models: [{name: a, kind: python, source: 'm.py:A', outputs: {x: {kind: score, nmae: [a, b, c]}}}]",
         "models.0 (a).outputs.x.nmae: unknown key; did you mean `name`?"),
        ("models: [{name: b, url: 'http://x'}]",
         "models.0 (b).url: `url` is a key of kind triton or arterys, not of kind builtin"),
        ("models: [{name: t, kind: triton, url: 'http://x', model_name: m, source: ct-body}]",
         "models.0 (t).source: `source` is a key of kind builtin, python, torchscript, monai-bundle, monai-deploy or nnunet, "
         "not of kind triton"),
        ("models: [{name: a, kind: arterys, url: 'http://x', pipeline: {}}]",
         "models.0 (a).pipeline: `pipeline` is a key of kind torchscript or triton, not of kind arterys"),
    ],
)
def test_an_unknown_key_is_refused_naming_where_it_is_and_the_nearest_name(tmp_path, text, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"\n  {line}" in str(err.value)


def test_every_settings_class_refuses_unknown_keys():
    import inspect

    from pydantic import BaseModel

    import pacsworker.config as config

    classes = [c for _, c in inspect.getmembers(config, inspect.isclass)
               if issubclass(c, BaseModel) and c.__module__ == config.__name__]
    assert len(classes) > 30
    assert [c.__name__ for c in classes if c.model_config.get("extra") != "forbid"] == []


def test_each_kind_of_model_is_its_own_class_and_kind_defaults_to_builtin():
    from pacsworker.config import BuiltinModelSettings, ModelSettings, Settings, TritonModelSettings

    settings = Settings(models=[{"name": "ct-body"}, {"name": "t", "kind": "triton", "url": "grpc://h:8001",
                                                     "model_name": "spleen"}])
    builtin, triton = settings.models
    assert type(builtin) is BuiltinModelSettings and builtin.kind == "builtin" and builtin.source == "ct-body"
    assert type(triton) is TritonModelSettings and isinstance(triton, ModelSettings)
    assert type(ModelSettings(name="x", kind="triton", url="http://h:8000", model_name="m")) is TritonModelSettings
    assert type(ModelSettings(name="ct-body")) is BuiltinModelSettings
    # a dump without defaults (kind included) reads back as the same kind
    again = Settings(models=[triton.model_dump(mode="json", exclude_defaults=True)]).models[0]
    assert again == triton
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        Settings(models=[{"name": "x", "kind": "onnx"}])
    with pytest.raises(ValueError, match="neither"):
        ModelSettings(name="d", kind="monai-deploy")


def test_fingerprints_of_unchanged_configurations_are_the_same_as_before_kinds_had_classes():
    """Job ids end with the fingerprint: values computed with the single ModelSettings class of 9f5b18a."""
    from pacsworker.config import ModelSettings

    segment = {"kind": "labelmap", "segments": [{"label": 1, "name": "A"}]}
    cases = {
        "c7b51dec": {"name": "ct-body"},
        "108cd462": {"name": "mr-brain", "kind": "builtin", "source": "mr-brain", "match": {"modalities": ["MR"]}},
        "03d17e45": {"name": "soft", "kind": "python", "source": "m.py:Soft", "options": {"a": 1}, "version": "2",
                     "outputs": {"mask": segment}},
        "55b63a3f": {"name": "ts", "kind": "torchscript", "source": "/m/model.ts", "device": "cpu",
                     "pipeline": {"pre": [{"name": "X", "args": {"k": 1}}]}},
        "f87ea9dc": {"name": "ts", "kind": "torchscript", "source": "/m/model.ts", "pipeline": "p.yaml"},
        "6f6ba9c2": {"name": "b", "kind": "monai-bundle", "source": "/b"},
        "a8bfd9bb": {"name": "t", "kind": "triton", "url": "http://h:8000", "model_name": "seg", "model_version": "2",
                     "request_timeout_seconds": 10},
        "4cfd5493": {"name": "a", "kind": "arterys", "url": "http://h:9000", "inference_command": "get-bounding-box-2d",
                     "wait_seconds": 5},
        "66d4699b": {"name": "d", "kind": "monai-deploy", "command": "run {input} {output}", "model_path": "/m"},
        "cda7372c": {"name": "d", "kind": "monai-deploy", "source": "/app", "options": {"x": "y"}},
        "e9b40776": {"name": "s", "kind": "python", "source": "m.py:S", "scope": "study", "irregular_spacing": "process"},
        "608a9011": {"name": "ct-body", "seg": {"labelmap_as": "labelmap"}},
    }
    assert {expected: ModelSettings(**fields).fingerprint() for expected, fields in cases.items()} == \
        {expected: expected for expected in cases}


def test_an_unknown_environment_variable_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PACSWORKER__SCP__PROT", "104")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "scp.prot: unknown key; did you mean `port`? (from the environment: PACSWORKER__SCP__PROT)" in str(err.value)
    monkeypatch.delenv("PACSWORKER__SCP__PROT")
    monkeypatch.setenv("PACSWORKER__SCPP__PORT", "104")  # a section that does not exist: pydantic-settings drops it
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "scpp: unknown key; did you mean `scp`? (from the environment: PACSWORKER__SCPP__PORT)" in str(err.value)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("scp:\n  port: 104\n  ae_title: [PACSWORKER\nmodels: []\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"configuration file {path} line 4, column 7: not valid YAML" in str(err.value)
    assert "<unicode string>" not in str(err.value)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("scp:\n  port: 104\n  ae_title: CT1\n  port: 11112\nmodels:\n  - name: a\n    name: b\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert f"{path} line 4, column 3" in str(err.value)
    assert "key 'port' is given twice (first on line 2)" in str(err.value)


def test_the_written_out_image_storage_classes_are_pydicoms_and_loading_settings_does_not_import_pydicom():
    """config.py writes the modalities' image storage SOP classes out (so that no command pays for importing
    pydicom to load its settings): each UID must be the one pydicom gives the name written beside it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from pydicom import uid

    from pacsworker import config

    source = Path(config.__file__).read_text()
    named = dict(re.findall(r'^\s+"([0-9.]+)",  # (\w+)$', source, re.MULTILINE))
    table = [u for classes in config.IMAGE_STORAGE_CLASSES.values() for u in classes]
    assert len(table) == len(set(table)) == len(named) > 20
    for value in table:
        assert str(getattr(uid, named[value])) == value, named[value]
        assert uid.UID(value).is_valid and "Storage" in named[value]
    loaded = subprocess.run([sys.executable, "-c", "import sys, pacsworker.config as c; c.load_settings(None); "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'sqlalchemy')))"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
