"""The documentation says what the code does: the configuration reference is generated from the
settings model and must be current; every message in the troubleshooting table is one the code
really logs or raises."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from pydantic_settings import EnvSettingsSource

from pacsworker.config import Settings
from pacsworker.config_reference import REGENERATE, render, sections, undescribed

DOCS = REPO / "docs"


def test_configuration_reference_is_current():
    written = (DOCS / "configuration.md").read_text()
    expected = render()
    if written != expected:
        diff = "\n".join(list(difflib.unified_diff(
            written.splitlines(), expected.splitlines(), "docs/configuration.md", "generated", lineterm=""))[:40])
        pytest.fail(f"docs/configuration.md is stale: run `{REGENERATE}`\n{diff}")


def test_every_setting_is_described():
    assert undescribed() == [], "give these settings a Field(description=...) in config.py, then regenerate"


def _leaf_keys(value: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, item in value.items():
        dotted = f"{prefix}.{key}" if prefix else key
        keys += _leaf_keys(item, dotted) if isinstance(item, dict) and item else [dotted]
    return keys


def test_reference_lists_every_key_of_the_defaults():
    text = (DOCS / "configuration.md").read_text()
    defaults = Settings().model_dump(by_alias=True)
    for key in _leaf_keys({k: v for k, v in defaults.items() if isinstance(v, dict)}):
        assert f"| `{key}` |" in text, f"{key} is missing from docs/configuration.md"


def test_environment_names_reach_their_keys(monkeypatch):
    """Each environment variable named in the reference sets the key it is listed for."""
    for name in list(os.environ):
        if name.startswith("PACSWORKER__"):
            monkeypatch.delenv(name)
    expected = {}
    for number, key in enumerate(k for s in sections() for k in s.keys if k.env and not k.env.endswith("...")):
        name, _, note = key.env.partition(" ")
        value = f"v{number}"
        monkeypatch.setenv(name, f'["{value}"]' if note and key.type.startswith("list") else value)
        if not note or key.type.startswith("list"):
            expected[key.path] = [value] if note else value
    found = EnvSettingsSource(Settings)()
    for path, value in expected.items():
        node = found
        for part in path.split("."):
            node = node[part] if isinstance(node, dict) and part in node else KeyError
        assert node == value, f"{path}: its environment variable does not reach it"


TROUBLESHOOTING = DOCS / "troubleshooting.md"


def _source_text() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "src" / "pacsworker").rglob("*.py")))


def test_troubleshooting_messages_are_the_real_ones():
    """The first column quotes what the log or the console says, `...` standing for what varies."""
    source = _source_text()
    rows = [line for line in TROUBLESHOOTING.read_text().splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    for row in rows:
        quoted = re.findall(r"`([^`]+)`", row.split(" | ")[0])
        for message in quoted:  # a message may be put together from parts: "%s rejected: %s"
            for fragment in (f.strip() for part in message.split("...") for f in part.split(": ")):
                if len(fragment) >= 8:
                    assert fragment in source, f"troubleshooting.md quotes {fragment!r}, which the code never says"


def test_operations_docs_are_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for name in ("operations.md", "troubleshooting.md", "configuration.md"):
        assert (DOCS / name).is_file() and f"docs/{name}" in readme


def test_generated_reference_pages_are_current():
    from pacsworker.docs_reference import PAGES, REGENERATE

    for name, render in PAGES.items():
        written, expected = (DOCS / name).read_text(), render()
        if written != expected:
            diff = "\n".join(list(difflib.unified_diff(
                written.splitlines(), expected.splitlines(), f"docs/{name}", "generated", lineterm=""))[:40])
            pytest.fail(f"docs/{name} is stale: run `{REGENERATE}`\n{diff}")


def test_the_conformance_statement_lists_what_the_receiver_negotiates(tmp_path):
    """Every SOP class and transfer syntax the receiver's AE supports is in the statement, and the
    statement lists no SOP class as SCP that the AE does not support."""
    from pacsworker.config import Settings
    from pacsworker.ledger import close_ledgers
    from pacsworker.scp.server import Receiver

    statement = (DOCS / "reference" / "conformance.md").read_text()
    ae = Receiver(Settings(storage={"data_dir": str(tmp_path)}), lambda record: None).ae
    close_ledgers()
    listed = set(re.findall(r"\| `([0-9.]+)` \| SCP \|", statement))
    supported = {str(cx.abstract_syntax) for cx in ae.supported_contexts}
    assert listed == supported
    for cx in ae.supported_contexts:
        for syntax in cx.transfer_syntax:
            assert f"`{syntax}`" in statement


def _blocks(language: str) -> list[tuple[str, str]]:
    """(file:line, text) of every block of ``language`` (a regular expression) in the README and docs/;
    a block marked ``signature`` (the reference's signatures) is not an example."""
    found = []
    for path in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        text = path.read_text()
        for match in re.finditer(rf"^```(?:{language})( [^\n]*)?\n(.*?)^```", text, re.S | re.M):
            if "signature" not in (match.group(1) or "").split():
                found.append((f"{path.relative_to(REPO)}:{text[:match.start()].count(chr(10)) + 1}", match.group(2)))
    return found


def test_every_yaml_example_in_the_docs_loads_against_the_settings(tmp_path, monkeypatch):
    """A block is a whole configuration, or (indented) keys of one model's entry: then it is checked
    inside a `kind: python` model."""
    from pacsworker.config import load_settings

    for name in list(os.environ):
        if name.startswith("PACSWORKER"):
            monkeypatch.delenv(name)
    blocks = _blocks("yaml|yml")
    assert len(blocks) >= 10
    for where, block in blocks:
        if block.startswith(" "):
            block = "models:\n  - name: example\n    kind: python\n    source: model.py:Model\n" + block
        config = tmp_path / "example.yaml"
        config.write_text(block)
        try:
            load_settings(config)
        except Exception as exc:  # noqa: BLE001 - the message says which block and why
            pytest.fail(f"{where}: the example does not load: {exc}")


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """mkdocs.yml's site: every page in the navigation, every link and anchor resolves (strict mode)."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    built = subprocess.run([str(mkdocs), "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                            "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "conformance" / "index.html").is_file()


def test_every_python_example_in_the_docs_runs(dicom_dir, tmp_path, monkeypatch):
    """Each Python block of docs/ runs; a model class it defines (a class with ``predict``) is built with
    its defaults and run on a real CT series, and what it returns must be a model output pacsworker takes."""
    import importlib.util

    from pacsworker.worker.series import Series
    from pacsworker.worker.volume import load_series

    series = Series(load_series(sorted((dicom_dir / "ct02_philips_ingenuity_headphantom_5mm").glob("*.dcm"))))
    blocks = [(where, block) for where, block in _blocks("python") if not where.startswith("README")]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for number, (where, block) in enumerate(blocks):
        path = tmp_path / f"example_{number}.py"
        path.write_text(block)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the message says which block and why
            pytest.fail(f"{where}: the example does not run: {exc!r}")
        models = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == path.stem
                  and callable(getattr(v, "predict", None))]
        for model in models:
            from pacsworker.worker.outputs import Boxes, Classification, LabelMap, ProbabilityMaps, Score

            result = model().predict(series)
            assert isinstance(result, LabelMap | ProbabilityMaps | Score | Classification | Boxes | dict), (where, result)


def test_the_conformance_statement_names_what_delivery_proposes(dicom_dir):
    """The SOP classes and transfer syntaxes a C-STORE destination is offered are those of real results
    (delivery proposes each file's own): each is listed with the SCU role."""
    from pacsworker.config import ModelSettings
    from pacsworker.worker.runtime import run_model

    statement = (DOCS / "reference" / "conformance.md").read_text()
    results = run_model(sorted((dicom_dir / "ct02_philips_ingenuity_headphantom_5mm").glob("*.dcm")),
                        ModelSettings(name="ct-body")).result_objects()
    for name, ds in results.items():
        assert f"| `{ds.SOPClassUID}` | SCU |" in statement, name
        assert ds.file_meta.TransferSyntaxUID.name in statement, name
