"""docker-compose.yml and the Dockerfile, checked by real parsers (no Docker engine needed)."""

from __future__ import annotations

import json
import subprocess

import yaml
from conftest import REPO, require_tool
from dockerfile_parse import DockerfileParser

from pacsworker.config import load_settings


def test_compose_file_is_valid_and_complete():
    tool = require_tool("docker-compose")
    result = subprocess.run([tool, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "orthanc", "scp", "worker", "flower"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("scp", "worker", "delivery"):
        assert services[name]["environment"]["PACSWORKER__QUEUE__BROKER_URL"].startswith("redis://")


def test_dockerfile_installs_the_package_and_runs_the_cli():
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    assert parser.baseimage.startswith("python:3.11")
    copies = [i["value"].split()[:-1] for i in parser.structure if i["instruction"] == "COPY"]
    for source in [s for sources in copies for s in sources]:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert json.loads(next(i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT")) == ["pacsworker"]
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    assert "brain]" in runs and "--no-deps \"deepbet==1.0.2\"" in runs  # the built-in mr-brain, no GUI toolkit


def test_compose_configuration_file_is_valid():
    settings = load_settings(REPO / "deploy" / "pacsworker.yaml")
    assert settings.destinations[0].url == "http://orthanc:8042/dicom-web"
