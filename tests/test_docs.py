"""The documentation says what the code does: the configuration reference is generated from the
settings model and must be current; every message in the troubleshooting table is one the code
really logs or raises."""

from __future__ import annotations

import difflib
import os
import re

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
