"""The deployment files stay consistent with the code: compose services, commands, settings and README."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from moderation.config import Settings
from moderation.jobs import QUEUE_GPU, QUEUE_MAINTENANCE, QUEUE_WEBHOOKS

ROOT = Path(__file__).resolve().parent.parent


def test_compose_has_every_role_and_valid_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu", "beat"}
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["command"][gpu["command"].index("-Q") + 1] == QUEUE_GPU
    assert "--pool" in gpu["command"] and "solo" in gpu["command"]
    cpu = services["worker-cpu"]["command"]
    assert set(cpu[cpu.index("-Q") + 1].split(",")) == {QUEUE_WEBHOOKS, QUEUE_MAINTENANCE}
    assert services["migrate"]["command"] == ["moderation", "migrate"]
    for name in ("api", "worker-gpu", "worker-cpu", "beat"):
        env = services[name]["environment"]
        assert {"MODERATION_DATABASE_URL", "MODERATION_REDIS_URL"} <= set(env)
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared


def test_compose_roles_are_restartable_and_stop_gracefully() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    # The image's health check probes the API's port: the other roles serve no HTTP.
    for name in ("worker-gpu", "worker-cpu", "beat"):
        assert services[name]["healthcheck"] == {"disable": True}, name
    # A GPU worker never falls back to loading the model on the CPU.
    assert services["worker-gpu"]["environment"]["MODERATION_DEVICE"] == "cuda"
    # Longer than Docker's 10 s: intake answers its waiting requests, a GPU batch finishes.
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert int(services[name]["stop_grace_period"].rstrip("s")) >= 40, name


def test_the_api_adds_up_its_processes_metrics_in_a_folder_emptied_at_start() -> None:
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    folder = api["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    script = api["command"][-1]
    assert script.index(f"rm -rf {folder}") < script.index("exec uvicorn") and "--workers" in script


def test_dockerfile_installs_torch_and_dependencies_before_copying_the_code() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    torch = next(i for i, line in enumerate(lines) if "pip install torch" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY moderation"))
    assert torch < code


def test_dockerfile_copies_paths_that_exist() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`MODERATION_{name.upper()}`" in readme, f"README lacks MODERATION_{name.upper()}"


def test_readme_quick_start_is_make_run_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make run$", quick, re.M) and re.search(r"^make test$", quick, re.M)
