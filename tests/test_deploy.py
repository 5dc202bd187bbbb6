"""The deployment files (docker-compose.yml, deploy/kubernetes/): they parse, have the shape the README
describes, and every EMBEDLIFT_* name they set is a real setting. (They cannot be run here: no container
engine or cluster; the container image itself is built and run in test_container.py.)"""

from __future__ import annotations

import dataclasses
import re

import yaml
from embedlift.models.options import env_name
from embedlift.models.spec import ENV, BaseSpec
from embedlift.service.settings import Settings

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
KUBERNETES = REPO / "deploy" / "kubernetes" / "embedlift.yaml"


def settings_names() -> set[str]:
    """Every EMBEDLIFT_* variable the service reads."""
    names = {env_name(f.name) for f in dataclasses.fields(Settings) if f.name != "base"}
    names |= {ENV.get(name, env_name(name)) for name in BaseSpec.__struct_fields__}
    return names


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\bEMBEDLIFT_[A-Z0-9_]+\b", text))


def test_the_names_used_are_real_settings():
    real = settings_names()
    assert {"EMBEDLIFT_STORE", "EMBEDLIFT_API_KEY", "EMBEDLIFT_PORT"} <= real  # the check itself sees the settings
    for path in (COMPOSE, KUBERNETES, REPO / "Dockerfile"):
        used = used_names(path.read_text())
        assert used, path
        assert used <= real, f"{path.name}: not settings: {sorted(used - real)}"


def test_compose_runs_two_replicas_over_pgvector_behind_nginx():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    replicas = [s for name, s in services.items() if name.startswith("embedlift-")]
    assert len(replicas) == 2
    assert "pgvector" in services["db"]["image"]
    for replica in replicas:
        assert replica["environment"]["EMBEDLIFT_STORE"].startswith("postgresql://") and "@db:5432/" in replica["environment"]["EMBEDLIFT_STORE"]
        assert replica["depends_on"]["db"]["condition"] == "service_healthy"
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert "server embedlift-1:8080" in nginx and "server embedlift-2:8080" in nginx
    assert any("nginx.conf" in v for v in services["nginx"]["volumes"])
    # nginx drops idle upstream connections before the replicas do (else a POST meets a closed one: 502)
    nginx_idle = int(re.search(r"^\s*keepalive_timeout\s+(\d+)s;", nginx, re.M).group(1))
    assert nginx_idle < Settings().keep_alive_timeout


def test_kubernetes_has_a_deployment_ready_on_ready_a_service_an_hpa_and_a_secret():
    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"} <= set(docs)
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {"secretRef": {"name": docs["Secret"]["metadata"]["name"]}} in container["envFrom"]
    assert "EMBEDLIFT_STORE" in docs["Secret"]["stringData"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
