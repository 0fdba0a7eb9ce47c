"""The Kubernetes manifests validate against the API schemas and point at the app's real
probe paths, port, settings and config format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import load_config
from service.settings import Settings
from tests.service.conftest import loaded

MANIFESTS = Path(__file__).parent.parent / "deploy" / "k8s" / "bagserve.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
BY_KIND: dict[str, dict[str, Any]] = {d["kind"]: d for d in DOCS}
CONTAINER = BY_KIND["Deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("doc", DOCS, ids=[d["kind"] for d in DOCS])
def test_manifest_validates_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_every_kind_is_there() -> None:
    assert set(BY_KIND) == {"ConfigMap", "Deployment", "Service",
                            "HorizontalPodAutoscaler"}
    target = BY_KIND["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment",
                                                BY_KIND["Deployment"]["metadata"]["name"])
    assert BY_KIND["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def test_probes_hit_real_routes_on_the_real_port() -> None:
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    assert ports["http"] == int(env["BAGSERVE_PORT"]) == Settings().port
    with TestClient(create_app(Settings(), models=[loaded("items")])) as client:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = CONTAINER[probe]["httpGet"]
            assert action["port"] in ports
            assert client.get(action["path"]).status_code == 200, probe
        client.app.state.service.begin_drain()  # type: ignore[attr-defined]
        assert client.get(CONTAINER["readinessProbe"]["httpGet"]["path"]).status_code == 503
        assert client.get(CONTAINER["livenessProbe"]["httpGet"]["path"]).status_code == 200


def test_env_config_and_mounts_match_the_app(tmp_path: Path) -> None:
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    fields = {f"BAGSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields
    Settings(**{k.removeprefix("BAGSERVE_").lower(): v for k, v in env.items()})
    mounts = {m["name"]: m for m in CONTAINER["volumeMounts"]}
    config_path = Path(env["BAGSERVE_CONFIG"])
    assert config_path.parent == Path(mounts["config"]["mountPath"])
    assert mounts["models"]["readOnly"] is True
    text = BY_KIND["ConfigMap"]["data"][config_path.name]
    (tmp_path / config_path.name).write_text(text)
    for spec in load_config(tmp_path / config_path.name):
        assert spec.checkpoint is not None
        assert spec.checkpoint.is_relative_to(mounts["models"]["mountPath"])


def test_termination_grace_covers_the_drain() -> None:
    pod = BY_KIND["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    pause = int(CONTAINER["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > float(env["BAGSERVE_SHUTDOWN_GRACE_S"]) + pause
    name, _, tag = CONTAINER["image"].rpartition(":")
    assert name and tag and tag != "latest"
