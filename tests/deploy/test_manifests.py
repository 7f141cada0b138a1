"""deploy/compose.yaml and deploy/k8s: valid for their tools, and true to the code.

No container engine or cluster runs tests here, so: the compose file is checked by the
compose client's own ``config`` (a loud skip where no client is installed), the
Kubernetes manifests are built by ``kubectl kustomize`` (which parses every file), every
``jpki`` invocation they contain is parsed by the real CLI, every JPKI_* variable they set
is one the code reads, and every Secret they mount is one make-secrets.sh creates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from jpki.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
SERVICES = {
    "init", "rabbitmq", "mosquitto", "postgres", "ca-init", "orchestrator", "tsm", "ca",
    "ocsp", "gateway-1", "gateway-2", "fleet",
}
# Every jpki invocation of the deploy files (compose and Kubernetes), as they pass it.
INVOCATIONS = [
    ["orchestrator", "--data-dir", "/data"],
    ["worker", "tsm", "--data-dir", "/data"],
    ["worker", "ca", "--data-dir", "/data"],
    ["ca", "init", "--data-dir", "/data", "--db-url", "postgresql+asyncpg://h/db"],
    ["ocsp", "serve", "--data-dir", "/data", "--host", "0.0.0.0", "--port", "8080",
     "--db-url", "postgresql+asyncpg://h/db"],
    ["gateway", "--name", "gateway-1", "--metrics-port", "9100"],
    ["fleet", "--phones", "50", "--data-dir", "/data", "--ocsp-url", "http://ocsp:8080/ocsp",
     "--report", "/data/fleet-report.json"],
    ["ops", "consumers", "--queue", "orchestrator"],
    ["ops", "broker-users", "--user", "jpki=/p", "--administrator", "--out", "/o"],
    ["ops", "mqtt-passwords", "--phones", "50", "--phone-secret-file", "/s",
     "--gateway-password-file", "/g", "--out", "/o"],
]


def _deploy_text() -> str:
    files = [COMPOSE, *K8S_FILES, *DEPLOY.glob("*.sh"), *(DEPLOY / "k8s").glob("*.sh")]
    return "\n".join(path.read_text() for path in files)


def _tool_or_skip(*names: str) -> list[str]:
    for name in names:
        parts = name.split()
        found = shutil.which(parts[0])
        if found and subprocess.run(  # noqa: S603 - a probe of the client
            [found, *parts[1:], "version"], capture_output=True, check=False
        ).returncode == 0:
            return [found, *parts[1:]]
    pytest.skip(f"*** none of {names} installed: SKIPPED (apt-get install docker-compose) ***")


def test_compose_file_is_valid_for_the_compose_client() -> None:
    compose = _tool_or_skip("docker compose", "docker-compose")
    run = subprocess.run(  # noqa: S603
        [*compose, "-f", str(COMPOSE), "config", "--services"],
        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    assert set(run.stdout.split()) == SERVICES


def test_kubernetes_manifests_build_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("*** kubectl is not installed: SKIPPED ***")
    run = subprocess.run(  # noqa: S603
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    kinds = re.findall(r"^kind: (\w+)$", run.stdout, flags=re.MULTILINE)
    assert sorted(set(kinds)) == [
        "ConfigMap", "Deployment", "Job", "Namespace", "PersistentVolumeClaim", "Service",
        "StatefulSet",
    ]
    # the ConfigMap carries the committed definitions (kustomize adds a hash suffix)
    definitions = (DEPLOY / "rabbitmq" / "definitions.json").read_text()
    assert '"x-delivery-limit": 5' in definitions and "definitions.json: |" in run.stdout
    # no Secret is ever rendered from the repository: they are made at deploy time
    assert "Secret" not in kinds


def test_every_kubernetes_file_is_in_the_kustomization() -> None:
    kustomization = (DEPLOY / "kustomization.yaml").read_text()
    for path in K8S_FILES:
        assert f"k8s/{path.name}" in kustomization


@pytest.mark.parametrize("args", INVOCATIONS, ids=lambda a: " ".join(a[:2]))
def test_deploy_invocations_parse_with_the_real_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # what the deploy files put in the environment (the entrypoint or Secrets)
    monkeypatch.setenv("JPKI_AMQP_URL", "amqp://u:p@rabbitmq:5672/")
    monkeypatch.setenv("JPKI_MQTT_URL", "mqtt://u:p@mosquitto:1883")
    monkeypatch.setenv("JPKI_DB_URL", "postgresql+asyncpg://u:p@postgres:5432/jpki")
    command: click.Command = main
    path = list(args)
    while isinstance(command, click.Group):
        name = path.pop(0)
        found = command.get_command(click.Context(command), name)
        assert found is not None, f"jpki has no command {name!r}"
        command = found
    command.make_context(command.name or "", path)  # raises on an unknown option or value
    words = [arg for arg in args[:2] if not arg.startswith("-")]
    as_list = ", ".join(f'"{word}"' for word in words)
    text = _deploy_text()
    assert " ".join(words) in text or as_list in text or "\n".join(words) in text


def test_every_jpki_variable_the_deploy_sets_is_read_by_the_code() -> None:
    code = "\n".join(
        path.read_text()
        for package in ("infra", "jpki", "workers", "orchestrator", "device_sim")
        for path in (ROOT / package).rglob("*.py")
    ) + (DEPLOY / "entrypoint.sh").read_text()
    names = set(re.findall(r"\b(JPKI_[A-Z_]+)\b", _deploy_text()))
    assert {"JPKI_AMQP_URL", "JPKI_MQTT_PHONE_SECRET_FILE", "JPKI_CA_PASSPHRASE_FILE"} <= names
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    from_files = re.search(r"for name in ([A-Z_ ]+); do", entrypoint)
    assert from_files is not None
    read = {name for name in names if f'"{name}"' in code}
    read |= {f"{name}_FILE" for name in from_files.group(1).split()}  # the entrypoint's
    read.add("JPKI_PHONES")  # the deploy's own knob (init-secrets.sh, compose)
    assert sorted(names - read) == []

def test_every_mounted_secret_is_made_by_make_secrets() -> None:
    manifests = "\n".join(path.read_text() for path in K8S_FILES)
    referenced = set(re.findall(r"secretName: ([\w-]+)", manifests))
    referenced |= set(re.findall(r"secretKeyRef: \{name: ([\w-]+)", manifests))
    referenced |= set(re.findall(r"- secret:\n\s+name: ([\w-]+)", manifests))
    made = set(re.findall(r"^secret (jpki-[\w-]+)", (DEPLOY / "k8s" / "make-secrets.sh")
                          .read_text(), flags=re.MULTILINE))
    optional = {"jpki-operators"}  # call-centre keys: mounted if an operator made them
    assert referenced - optional == made
    assert "jpki-ca" in made and "jpki-tsm" in made
    assert "kind: Secret" not in manifests and "passphrase:" not in manifests.replace(
        "subPath: passphrase", ""
    )
