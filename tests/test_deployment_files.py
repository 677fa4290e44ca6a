"""docker-compose.yml and the Dockerfile, checked by real parsers (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from conftest import (
    REPO,
    Pacsworker,
    free_port,
    port_open,
    require_tool,
    wait_until,
    write_config,
)
from pacsworker.config import load_settings


def test_compose_file_is_valid_and_complete():
    tool = require_tool("docker-compose")
    result = subprocess.run([tool, "-f", str(REPO / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=REPO)
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


# ------------------------------------------------------------------------------------------------
# health checks, volumes, the viewer and its same-origin proxy


def compose_services() -> dict:
    tool = require_tool("docker-compose")
    result = subprocess.run([tool, "-f", str(REPO / "docker-compose.yml"), "--profile", "gpu1", "config"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def volume_mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (docker-compose 1 prints ``source:target:mode``)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def test_every_service_has_a_health_check_and_the_volumes_it_needs():
    compose = compose_services()
    services = compose["services"]
    assert {"redis", "orthanc", "scp", "worker", "worker-gpu1", "delivery", "flower", "ohif"} <= set(services)
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"service {name} has no health check"
    assert {"data", "redis-data", "orthanc-storage"} <= set(compose["volumes"])
    mounts = {name: volume_mounts(service) for name, service in services.items()}
    for name in ("scp", "worker", "worker-gpu1", "delivery"):
        assert mounts[name]["/data"] == "data", f"{name} does not share the data volume"
        assert services[name]["environment"]["PACSWORKER__STORAGE__DATA_DIR"] == "/data"
    assert mounts["redis"]["/data"] == "redis-data" and "--appendonly" in services["redis"]["command"]
    assert mounts["orthanc"]["/var/lib/orthanc/db"] == "orthanc-storage"
    assert services["scp"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_one_worker_per_gpu():
    services = compose_services()["services"]
    seen = {}
    for name in ("worker", "worker-gpu1"):
        device = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        command = services[name]["command"]
        node = command[command.index("--name") + 1]
        assert node.split("@")[0] in services[name]["healthcheck"]["test"][1], "the health check pings another worker"
        seen[name] = (tuple(device["device_ids"]), node)
    assert len({ids for ids, _ in seen.values()}) == 2 and len({node for _, node in seen.values()}) == 2
    assert services["worker-gpu1"]["profiles"] == ["gpu1"]


def nginx_blocks(text: str) -> list:
    """nginx configuration as nested ``(words, children)``; children is None for a simple directive."""
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};"]+', re.sub(r"#[^\n]*", "", text))
    stack: list[list] = [[]]
    words: list[str] = []
    for token in tokens:
        if token == "{":
            block = (words, [])
            stack[-1].append(block)
            stack.append(block[1])
            words = []
        elif token == "}":
            assert not words, f"directive {words} lacks its ';'"
            stack.pop()
        elif token == ";":
            stack[-1].append((words, None))
            words = []
        else:
            words.append(token.strip('"'))
    assert len(stack) == 1 and not words, "unbalanced braces in the nginx configuration"
    return stack[0]


def test_viewer_and_dicomweb_share_one_origin():
    services = compose_services()["services"]
    ohif = services["ohif"]
    mounts = {target: Path(source) for target, source in volume_mounts(ohif).items()}
    conf_path = mounts["/etc/nginx/conf.d/default.conf"]
    config_path = mounts["/usr/share/nginx/html/app-config.js"]
    assert conf_path.is_file() and config_path.is_file()

    server = next(children for words, children in nginx_blocks(conf_path.read_text()) if words == ["server"])
    listen = next(words[1] for words, children in server if words[0] == "listen")
    assert any(p["target"] == int(listen) for p in ohif["ports"]), "the published port is not the one nginx listens on"
    locations = {tuple(words[1:]): children for words, children in server if words[0] == "location"}
    proxy = locations[("/dicom-web/",)]
    upstream = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", next(w[1] for w, _ in proxy if w[0] == "proxy_pass"))
    assert upstream and upstream.group(1) in services, "the proxy points at no compose service"
    assert upstream.group(1) == "orthanc" and upstream.group(2) == "8042" and upstream.group(3) == "/dicom-web/"
    assert services["orthanc"]["environment"]["ORTHANC__DICOM_WEB__ROOT"] == upstream.group(3)
    assert ["try_files", "$uri", "$uri/", "/index.html"] in [w for w, _ in locations[("/",)]]

    text = config_path.read_text()
    config = json.loads(text[text.index("window.config = ") + len("window.config = "):].rstrip().rstrip(";"))
    source = config["dataSources"][0]["configuration"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert source[root] + "/" == "/dicom-web/", f"{root} is not the same-origin proxy"
    # the same data source settings that tests/test_ohif.py drives in a real browser
    from ohif_browser import app_config_js

    tested = app_config_js()
    tested = json.loads(tested[len("window.config = "):].rstrip().rstrip(";"))["dataSources"][0]["configuration"]
    assert {k: v for k, v in source.items() if k != "friendlyName"} == {
        k: v for k, v in tested.items() if k != "friendlyName"}
    version = re.search(r'OHIF_VERSION = "([^"]+)"', (REPO / "tests" / "test_ohif.py").read_text()).group(1)
    assert ohif["image"] == f"ohif/app:v{version}", "the viewer image is not the version the tests drive"

    nginx = shutil.which("nginx")
    if nginx:  # its own syntax check, with the upstream resolvable offline
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "default.conf").write_text(conf_path.read_text().replace("orthanc:8042", "127.0.0.1:8042"))
            main = Path(tmp) / "nginx.conf"
            main.write_text(f"pid {tmp}/nginx.pid; error_log stderr; events {{}} http {{ access_log off; "
                            f"include {tmp}/default.conf; }}")
            result = subprocess.run([nginx, "-t", "-c", str(main), "-p", tmp], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr


def test_scp_health_check_answers_like_the_container_runs_it(tmp_path):
    test = compose_services()["services"]["scp"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    port = free_port()
    config = write_config(tmp_path / "pacsworker.yaml", scp={"port": port, "allowed_calling_aets": ["MODALITY"]},
                          storage={"data_dir": str(tmp_path / "data")})
    env = {**os.environ, "PACSWORKER_CONFIG": str(config)}

    def check() -> int:
        return subprocess.run([sys.executable, "-c", test[3]], env=env, capture_output=True, timeout=60).returncode

    assert check() == 1, "healthy with no receiver running"
    receiver = Pacsworker(["scp"], config, tmp_path / "scp.log")
    try:
        wait_until(lambda: port_open(port), 60, what="the receiver")
        assert check() == 0, receiver.output()
        assert "C-ECHO from MODALITY" in receiver.output()
    finally:
        receiver.stop()


# ------------------------------------------------------------------------------------------------
# systemd units for an install without containers

UNITS = {"scp": REPO / "deploy" / "pacsworker-scp.service", "worker": REPO / "deploy" / "pacsworker-worker@.service"}


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, repeated keys kept in order (configparser would merge them)."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def test_systemd_units_run_the_venv_as_an_unprivileged_user():
    data_dir = "/var/lib/pacsworker"
    for role, path in UNITS.items():
        entries = unit_entries(path)
        service = {k: v for s, k, v in entries if s == "Service"}
        environment = [v for s, k, v in entries if s == "Service" and k == "Environment"]
        assert service["User"] == "pacsworker" and service["Restart"] == "on-failure"
        assert service["ExecStart"].startswith(f"/opt/pacsworker/venv/bin/pacsworker {role}")
        assert "PACSWORKER_CONFIG=/etc/pacsworker/pacsworker.yaml" in environment
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
        assert service["ReadWritePaths"] == data_dir
        assert ("Install", "WantedBy", "multi-user.target") in entries
    worker = {k: v for s, k, v in unit_entries(UNITS["worker"]) if s == "Service"}
    assert "%i" in worker["ExecStart"] and "%h" not in worker["ExecStart"], "systemd would expand %h to a folder"


def test_systemd_units_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze not installed; the units' keys are checked above")
    venv = Path(sys.executable).parent.parent  # ExecStart must name a real executable to verify
    for path in UNITS.values():
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/pacsworker/venv", str(venv)))
    units = [str(tmp_path / UNITS["scp"].name), str(tmp_path / "pacsworker-worker@0.service")]
    result = subprocess.run([tool, "verify", *units], capture_output=True, text=True)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pacsworker" in line]
    assert result.returncode == 0 and not complaints, "\n".join(complaints) or result.stderr


# ------------------------------------------------------------------------------------------------
# what the image installs (scripts/fresh_install_check.py replays these steps before the suite)


def fresh_install_check():
    """scripts/fresh_install_check.py as a module: its reading of the Dockerfile is the one tested here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fresh_install_check", REPO / "scripts" / "fresh_install_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_installs_the_iod_validator():
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    check = fresh_install_check()
    runs = [check.shell_commands(i["value"]) for i in parser.structure if i["instruction"] == "RUN"]
    apt = next((commands for commands in runs if any(c[:2] == ["apt-get", "install"] for c in commands)), None)
    assert apt, "the Dockerfile installs no Debian package: dciodvfy (dicom3tools) is missing from the image"
    install = next(c for c in apt if c[:2] == ["apt-get", "install"])
    assert "dicom3tools" in install, "the image lacks dicom3tools: its validation gate would skip dciodvfy"
    assert "--no-install-recommends" in install and "-y" in install
    # one layer: the package lists are fetched and removed in the same RUN
    assert apt[0] == ["apt-get", "update"] and apt[-1] == ["rm", "-rf", "/var/lib/apt/lists/*"]


def test_image_pip_installs_the_package_with_the_runtime_extras_and_a_chosen_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    parser = DockerfileParser(path=str(REPO / "Dockerfile"), build_args={"TORCH_SPEC": "torch==9.9"})
    check = fresh_install_check()
    # the smoke's own reading of the Dockerfile finds the commands dockerfile-parse finds
    steps = check.image_steps(dockerfile, {"TORCH_SPEC": "torch==9.9"})
    from_parser = [words for i in parser.structure if i["instruction"] == "RUN"
                   for words in check.shell_commands(check.expand(i["value"], parser.args))]
    assert [words for kind, _, words in steps if kind == "other"] == [w for w in from_parser if w[0] != "pip"]
    installs = check.pip_installs(dockerfile, {"TORCH_SPEC": "torch==9.9"})
    assert len(installs) == sum(1 for w in from_parser if w[0] == "pip")
    # torch first, from the build argument (a CUDA build on GPU hosts), so the package cannot pull another
    assert installs[0] == ["--no-cache-dir", "torch==9.9"]
    package = next(a for args in installs for a in args if a.startswith(".["))
    extras = set(package.removeprefix(".[").removesuffix("]").split(","))
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert {"brain", "monitor"} <= extras <= declared and "test" not in extras
    deepbet = next(args for args in installs if any(a.startswith("deepbet==") for a in args))
    assert "--no-deps" in deepbet
    pin = next(a for a in deepbet if a.startswith("deepbet=="))
    assert f'--no-deps "{pin}"' in (REPO / "scripts" / "setup.sh").read_text(), "the image and setup.sh pin other deepbets"
