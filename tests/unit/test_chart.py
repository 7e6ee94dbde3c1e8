"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm v4's Go SDK).

Every rendered object is checked against the Kubernetes API's models (field names, required
fields) and against the other objects (selectors, ports, RBAC subjects); the RBAC rules must equal
what the operator's tests recorded it doing against the API emulator
(tests/data/operator-api-usage.json); values.schema.json must reject wrong values.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from chart_render import CHART, NAMESPACE, RELEASE, SCENARIOS, render

ROOT = Path(__file__).resolve().parents[2]
USAGE = ROOT / "tests" / "data" / "operator-api-usage.json"
# What a multi-node training run adds (the Service of its Job), recorded by
# tests/integration/test_operator_nodes.py the same way.
NODES_USAGE = ROOT / "tests" / "data" / "operator-api-usage-nodes.json"
OPERATOR_CONFIG = ROOT / "operator" / "selfimprove_operator" / "k8s" / "config.py"

try:  # the native library may fail to load, not only to import
    import helm_python as helm

    helm.helm_sdk_version()
except Exception as exc:  # pragma: no cover - exercised only where the SDK is missing
    if os.environ.get("CI"):
        raise
    pytest.skip(f"helm-python-sdk unavailable ({exc}); CI requires it", allow_module_level=True)


def require(condition: bool, reason: str) -> None:
    """Skip on a developer machine, fail in CI (where everything must be in place)."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


# ---------------------------------------------------------------------------------- rendering
KINDS = {
    ("v1", "ServiceAccount"): ("V1ServiceAccount", True),
    ("v1", "Service"): ("V1Service", True),
    ("v1", "ConfigMap"): ("V1ConfigMap", True),
    ("apps/v1", "Deployment"): ("V1Deployment", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("V1ClusterRole", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("V1ClusterRoleBinding", False),
    ("rbac.authorization.k8s.io/v1", "Role"): ("V1Role", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("V1RoleBinding", True),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (None, True),
    ("kopf.dev/v1", "ClusterKopfPeering"): (None, False),
    ("kopf.dev/v1", "KopfPeering"): (None, True),
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


_RENDERED: dict[str, list[dict]] = {}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request, chart):
    name = request.param
    if name not in _RENDERED:
        _RENDERED[name] = render(chart, SCENARIOS[name])
    return name, SCENARIOS[name], _RENDERED[name]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------- objects
def check_model(data, type_name: str, path: str, problems: list[str]) -> None:
    """Every key of `data` is a field of the Kubernetes model `type_name`, recursively."""
    import kubernetes.client.models as models

    if data is None:
        return
    if type_name.startswith("list["):
        for i, item in enumerate(data):
            check_model(item, type_name[5:-1], f"{path}[{i}]", problems)
        return
    if type_name.startswith("dict["):
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in data.items():
            check_model(item, inner, f"{path}.{key}", problems)
        return
    model = getattr(models, type_name, None)
    if model is None:  # str, int, bool, object (IntOrString, quantities) …
        return
    if not isinstance(data, dict):
        problems.append(f"{path}: expected an object ({type_name}), got {data!r}")
        return
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}.{key}: not a field of {type_name}")
        else:
            check_model(value, model.openapi_types[fields[key]], f"{path}.{key}", problems)


def test_every_object_is_a_valid_kubernetes_object(scenario):
    from kubernetes.client import ApiClient

    name, _, docs = scenario
    assert docs, "nothing rendered"
    client = ApiClient()
    seen = set()
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        assert key in KINDS, f"{name}: unexpected apiVersion/kind {key}"
        model, namespaced = KINDS[key]
        meta = doc.get("metadata") or {}
        assert DNS_SUBDOMAIN.match(meta.get("name", "")), f"{key}: bad metadata.name {meta.get('name')!r}"
        assert len(meta["name"]) <= 63
        if namespaced:
            assert DNS_LABEL.match(meta.get("namespace", "")), f"{key} {meta['name']}: needs metadata.namespace"
        else:
            assert "namespace" not in meta, f"cluster-scoped {key} {meta['name']} has a namespace"
        ident = (key, meta.get("namespace"), meta["name"])
        assert ident not in seen, f"{name}: duplicate object {ident}"
        seen.add(ident)
        labels = meta.get("labels") or {}
        assert labels.get("app.kubernetes.io/instance") == RELEASE
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        if model:
            problems: list[str] = []
            check_model(doc, model, doc["kind"], problems)
            assert not problems, f"{name}: " + "; ".join(problems)
            # Deserializing calls the models' setters, which reject missing required fields.
            client._ApiClient__deserialize(doc, model)


def test_deployment(scenario):
    name, values, docs = scenario
    dep = one(docs, "Deployment")
    spec = dep["spec"]
    standby = values.get("operator", {}).get("standby", {}).get("enabled", False)
    assert spec["replicas"] == (2 if standby else 1)
    assert spec["strategy"] == {"type": "Recreate"}
    template_labels = spec["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= template_labels.items(), "selector must match the pod labels"
    pod = spec["template"]["spec"]
    sa_name = values.get("serviceAccount", {}).get("name") or f"{RELEASE}-selfimprove"
    assert pod["serviceAccountName"] == sa_name
    # Restricted Pod Security Standard.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    assert container["image"] and ":" in container["image"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["command"] == ["selfimprove", "operator"]
    args = container["args"]
    watch = values.get("watchNamespaces") or ([NAMESPACE] if values.get("rbac", {}).get("scope") == "namespaced" else [])
    assert [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")] == watch
    port = values.get("operator", {}).get("metrics", {}).get("port", 8080)
    assert f"--metrics-port={port}" in args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port, "health": 8081}
    envs = [e["name"] for e in container["env"]]
    assert len(envs) == len(set(envs)), "duplicate env vars"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SELFIMPROVE_STANDALONE"]["value"] == ("false" if standby else "true")
    assert env["SELFIMPROVE_LIVENESS_ENDPOINT"]["value"] == "http://0.0.0.0:8081/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        if probe in container:
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    for vm in container.get("volumeMounts", []):
        assert vm["name"] in {v["name"] for v in pod.get("volumes", [])}


def env_of(docs: list[dict]) -> dict[str, str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_worker_settings_reach_the_operator(chart):
    env = env_of(render(chart, SCENARIOS["custom-gpu"]))
    assert env["SELFIMPROVE_GPU_RESOURCE_NAME"] == "amd.com/gpu"
    assert env["SELFIMPROVE_GPUS"] == "2"
    assert env["SELFIMPROVE_WORKER_IMAGE"] == "registry.local/worker@sha256:" + "a" * 64
    assert env["SELFIMPROVE_IMAGE_PULL_POLICY"] == "Always"
    assert env["SELFIMPROVE_IMAGE_PULL_SECRETS"] == "regcred"
    assert json.loads(env["SELFIMPROVE_NODE_SELECTOR"]) == {"gpu.vendor": "amd"}
    assert json.loads(env["SELFIMPROVE_TOLERATIONS"]) == [
        {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert env["SELFIMPROVE_STORAGE_ENDPOINT"] == "http://minio.minio.svc:9000"
    assert env["SELFIMPROVE_STORAGE_REGION"] == "eu-west-1"
    assert env["SELFIMPROVE_STORAGE_SECRET"] == "minio-creds"
    default = env_of(_RENDERED.get("default") or render(chart))
    assert default["SELFIMPROVE_GPU_RESOURCE_NAME"] == "nvidia.com/gpu"
    assert default["SELFIMPROVE_GPUS"] == "1"
    assert default["SELFIMPROVE_WORKER_IMAGE"] == f"ghcr.io/selfimprove/worker:{chart.metadata['appVersion']}"
    assert json.loads(default["SELFIMPROVE_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    assert default["SELFIMPROVE_RUN_AS_USER"] == "10001"
    from selfimprove_operator.k8s.config import OperatorConfig
    assert OperatorConfig.from_env({"SELFIMPROVE_BACKOFF_LIMIT_PER_INDEX": default["SELFIMPROVE_BACKOFF_LIMIT_PER_INDEX"]}
                                   ).backoff_limit_per_index is True


def operator_env_names() -> set[str]:
    """SELFIMPROVE_<FIELD> for every field of the operator's config (k8s/config.py)."""
    import dataclasses

    from selfimprove_operator.k8s import config

    return {config.ENV_PREFIX + f.name.upper() for f in dataclasses.fields(config.OperatorConfig)}


# Chart settings the operator does not read yet (k8s/config.py has no such field): the chart
# already sets them so that adding the field is all it takes. Remove a name once it is read.
def test_env_names_are_the_ones_the_operator_reads(chart):
    require(OPERATOR_CONFIG.exists(), f"{OPERATOR_CONFIG.relative_to(ROOT)} not written yet")
    read = operator_env_names()
    set_by_chart = {n for n in env_of(render(chart, SCENARIOS["custom-gpu"])) if n.startswith("SELFIMPROVE_")}
    assert sorted(set_by_chart - read) == [], "the chart sets variables the operator never reads"


def operator_config_from_chart(monkeypatch, docs: list[dict]):
    """The OperatorConfig `selfimprove operator` builds from the rendered Deployment's env and args."""
    from selfimprove_operator import cli
    from selfimprove_operator.k8s import handlers

    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("SELFIMPROVE_")]:
        monkeypatch.delenv(name)
    for e in container["env"]:
        monkeypatch.setenv(e["name"], e.get("value", "pod-0"))
    seen = []
    monkeypatch.setattr(handlers, "run_operator", lambda config: seen.append(config) or 0)
    assert container["command"][0] == "selfimprove"
    assert cli.main(container["command"][1:] + container["args"]) == 0
    return seen[0]


@pytest.mark.parametrize("name", ["default", "custom-gpu", "namespaced-2", "standby", "servicemonitor"])
def test_operator_reads_the_chart_settings(chart, monkeypatch, name):
    require(OPERATOR_CONFIG.exists(), f"{OPERATOR_CONFIG.relative_to(ROOT)} not written yet")
    values = merge(yaml.safe_load((CHART / "values.yaml").read_text()), SCENARIOS[name])
    docs = _RENDERED.get(name) or render(chart, SCENARIOS[name])
    config = operator_config_from_chart(monkeypatch, docs)
    worker, op = values["worker"], values["operator"]
    watch = values["watchNamespaces"] or ([NAMESPACE] if values["rbac"]["scope"] == "namespaced" else [])
    assert list(config.namespaces) == watch and config.clusterwide == (not watch)
    image = worker["image"]
    assert config.worker_image == (f"{image['repository']}@{image['digest']}" if image["digest"]
                                   else f"{image['repository']}:{image['tag'] or chart.metadata['appVersion']}")
    assert config.image_pull_policy == image["pullPolicy"]
    assert list(config.image_pull_secrets) == worker["imagePullSecrets"]
    assert config.gpu_resource_name == worker["gpu"]["resourceName"]
    assert config.run_as_user == worker["runAsUser"]
    assert config.metrics_port == op["metrics"]["port"]
    assert config.liveness_endpoint == f"http://0.0.0.0:{op['probes']['port']}/healthz"
    assert config.standalone == (not op["standby"]["enabled"])
    assert config.peering_name == op["standby"]["peeringName"]
    assert config.workers == op["concurrency"] and config.verbose == op["verbose"]
    assert (config.progress_interval, config.progress_rate) == (op["progress"]["intervalSeconds"], op["progress"]["readsPerSecond"])
    assert config.log_format == op["logFormat"]
    assert config.reporting_instance == "pod-0"


def test_operator_command_line_parses(chart):
    from selfimprove_operator.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    require("operator" in sub.choices, "the `selfimprove operator` subcommand does not exist yet")
    for name in ("default", "namespaced-2", "standby", "standby-namespaced", "servicemonitor"):
        docs = _RENDERED.get(name) or render(chart, SCENARIOS[name])
        container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        cmd = container["command"][1:] + container["args"]
        try:
            parser.parse_args(cmd)
        except SystemExit as exc:  # argparse exits on unknown flags
            pytest.fail(f"{name}: `selfimprove {' '.join(cmd)}` does not parse ({exc})")


def test_service_and_servicemonitor_select_the_operator(scenario):
    name, values, docs = scenario
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    metrics = values.get("operator", {}).get("metrics", {})
    assert len(services) == (0 if metrics.get("service", {}).get("enabled") is False else 1)
    assert len(monitors) == (1 if metrics.get("serviceMonitor", {}).get("enabled") else 0)
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports
    for mon in monitors:
        (svc,) = services
        assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert mon["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        assert {e["port"] for e in mon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
        assert mon["metadata"]["labels"]["release"] == "prom"


def _metric_samples() -> set[str]:
    """Every sample name the operator's registry can expose (k8s/metrics.py), labelled or not."""
    from selfimprove_operator.k8s.metrics import Metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    return {fam.name + sfx for fam in Metrics(lambda: []).registry.collect() for sfx in suffixes[fam.type]}


def test_grafana_dashboard_is_off_by_default_and_uses_only_real_metrics(scenario):
    name, values, docs = scenario
    maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    wanted = values.get("operator", {}).get("metrics", {}).get("grafanaDashboard", {})
    if not wanted.get("enabled"):
        assert not maps, f"{name}: the dashboard is off by default"
        return
    (cm,) = maps
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's conventional label
    assert cm["metadata"]["namespace"] == wanted.get("namespace", NAMESPACE)
    assert cm["metadata"]["annotations"] == wanted.get("annotations", {})
    (text,) = cm["data"].values()
    dash = json.loads(text)
    assert text == (CHART / "dashboards" / "selfimprove-operator.json").read_text().rstrip("\n")
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    used = {m for e in exprs for m in re.findall(r"\bselfimprove_[a-z_]+", e)}
    known = _metric_samples()
    assert used and used <= known, f"the dashboard queries metrics the operator does not expose: {sorted(used - known)}"
    # every metric of the operator is on the dashboard somewhere
    bases = {re.sub(r"_(total|bucket|count|sum|created)$", "", m) for m in used}
    from selfimprove_operator.k8s.metrics import Metrics

    assert {fam.name for fam in Metrics(lambda: []).registry.collect()} <= bases
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_servicemonitor_without_service_fails(chart):
    with pytest.raises(helm.HelmError, match="serviceMonitor"):
        chart.render({"operator": {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}},
                     name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------- RBAC
def granted(docs: list[dict], kind: str) -> dict[str | None, set[tuple[str, str, str]]]:
    """{namespace: {(group, resource, verb)}} of the rendered Roles or ClusterRoles."""
    out: dict[str | None, set] = {}
    for role in by_kind(docs, kind):
        rules = out.setdefault(role["metadata"].get("namespace"), set())
        for rule in role["rules"]:
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        rules.add((group, resource, verb))
    return out


def test_bindings_reference_the_roles_and_the_service_account(scenario):
    name, values, docs = scenario
    sa_name = values.get("serviceAccount", {}).get("name") or f"{RELEASE}-selfimprove"
    accounts = by_kind(docs, "ServiceAccount")
    if values.get("serviceAccount", {}).get("create", True):
        assert [(a["metadata"]["name"], a["metadata"]["namespace"]) for a in accounts] == [(sa_name, NAMESPACE)]
    else:
        assert accounts == []
    namespaced = values.get("rbac", {}).get("scope") == "namespaced"
    watch = values.get("watchNamespaces") or [NAMESPACE]
    role_kind, binding_kind = ("Role", "RoleBinding") if namespaced else ("ClusterRole", "ClusterRoleBinding")
    roles = {(r["metadata"].get("namespace"), r["metadata"]["name"]) for r in by_kind(docs, role_kind)}
    bindings = by_kind(docs, binding_kind)
    assert bindings and len(bindings) == len(roles)
    if namespaced:
        assert {ns for ns, _ in roles} == set(watch)
        assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding"), \
            "namespaced RBAC must not grant anything cluster-wide"
    for b in bindings:
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io" and ref["kind"] == role_kind
        assert (b["metadata"].get("namespace"), ref["name"]) in roles
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]


NEVER = {"escalate", "bind", "impersonate", "*"}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings", "nodes"}
PEERING = {"kopfpeerings", "clusterkopfpeerings"}


def test_rbac_is_narrow(scenario):
    _, _, docs = scenario
    for kind in ("Role", "ClusterRole"):
        for rules in granted(docs, kind).values():
            for group, resource, verb in rules:
                assert verb not in NEVER and group != "*" and resource != "*"
                assert resource not in {"secrets", "configmaps"}, "the operator never reads secrets"


def load_usage() -> set[tuple[str, str, str]]:
    require(USAGE.exists(), f"{USAGE} (recorded by the operator's tests) does not exist yet")
    require(NODES_USAGE.exists(), f"{NODES_USAGE} (recorded by the operator's tests) does not exist yet")
    entries = json.loads(USAGE.read_text()) + json.loads(NODES_USAGE.read_text())
    out = set()
    for e in entries:
        group = "" if e["group"] in ("core", "v1") else e["group"]
        for verb in e["verbs"]:
            out.add((group, e["resource"], verb))
    return out


def expected_rules(usage, *, namespaced: bool, standby: bool, clusterwide: bool) -> set:
    base = {u for u in usage if u[1] not in PEERING}
    if namespaced:
        base = {u for u in base if u[1] not in CLUSTER_SCOPED}
    if standby:
        recorded = {u[2] for u in usage if u[1] in PEERING}
        verbs = recorded or {"list", "watch", "patch"}  # kopf: watch the peering object, patch keep-alives
        resource = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
        base |= {("kopf.dev", resource, v) for v in verbs}
    return base


@pytest.mark.parametrize("name", ["default", "standby", "namespaced-2", "standby-namespaced", "cluster-rbac-some-namespaces"])
def test_rbac_grants_exactly_what_the_operator_uses(chart, name):
    usage = load_usage()
    values = SCENARIOS[name]
    docs = _RENDERED.get(name) or render(chart, values)
    namespaced = values.get("rbac", {}).get("scope") == "namespaced"
    standby = values.get("operator", {}).get("standby", {}).get("enabled", False)
    clusterwide = not values.get("watchNamespaces") and not namespaced
    want = expected_rules(usage, namespaced=namespaced, standby=standby, clusterwide=clusterwide)
    got = granted(docs, "Role" if namespaced else "ClusterRole")
    assert got, "no rules rendered"
    for ns, rules in got.items():
        assert not (want - rules), f"{name} {ns or 'cluster'}: missing {sorted(want - rules)}"
        assert not (rules - want), f"{name} {ns or 'cluster'}: more than the operator uses {sorted(rules - want)}"


def test_peering_objects_match_the_operator_scope(scenario):
    name, values, docs = scenario
    standby = values.get("operator", {}).get("standby", {}).get("enabled", False)
    namespaced = values.get("rbac", {}).get("scope") == "namespaced"
    watch = values.get("watchNamespaces") or ([NAMESPACE] if namespaced else [])
    cluster_peerings = by_kind(docs, "ClusterKopfPeering")
    ns_peerings = by_kind(docs, "KopfPeering")
    if not standby:
        assert not cluster_peerings and not ns_peerings
        return
    peering = env_of(docs)["SELFIMPROVE_PEERING_NAME"]
    if watch:  # kopf peers per watched namespace
        assert not cluster_peerings
        assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in ns_peerings) == \
            sorted((ns, peering) for ns in watch)
    else:
        assert [p["metadata"]["name"] for p in cluster_peerings] == [peering] and not ns_peerings


# ---------------------------------------------------------------------------------- CRDs
def test_chart_crd_is_the_generated_crd():
    top = ROOT / "crds" / "selfimprove.dev_selfimproveruns.yaml"
    copy_ = CHART / "crds" / top.name
    assert copy_.read_text() == top.read_text(), \
        f"charts/selfimprove/crds/{top.name} differs from crds/: cp {top.relative_to(ROOT)} {copy_.relative_to(ROOT)}"


def test_chart_ships_the_crds_it_needs(chart):
    crds = {}
    for item in chart.crds:
        for doc in yaml.safe_load_all(item["data"]):
            if doc:
                assert doc["apiVersion"] == "apiextensions.k8s.io/v1" and doc["kind"] == "CustomResourceDefinition"
                crds[doc["metadata"]["name"]] = doc
    assert set(crds) == {"selfimproveruns.selfimprove.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for name, doc in crds.items():
        spec = doc["spec"]
        assert name == f"{spec['names']['plural']}.{spec['group']}"
        assert sum(v["storage"] for v in spec["versions"]) == 1
        assert all("schema" in v for v in spec["versions"])
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    try:  # the resources kopf itself looks for
        from kopf._cogs.structs import references
    except ImportError:
        return
    for sel, crd in ((references.CLUSTER_PEERINGS_K, "clusterkopfpeerings.kopf.dev"),
                     (references.NAMESPACED_PEERINGS_K, "kopfpeerings.kopf.dev")):
        assert f"{sel.plural or sel.any_name}.{sel.group}" == crd and sel.version in {v["name"] for v in crds[crd]["spec"]["versions"]}


# ---------------------------------------------------------------------------------- lint, schema
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_helm_lint_is_clean(name):
    report = helm.lint(CHART, SCENARIOS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.fixture(scope="module")
def schema() -> dict:
    data = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(data)
    assert data["$schema"] == "http://json-schema.org/draft-07/schema#"
    return data


@pytest.fixture(scope="module")
def defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_defaults_and_scenarios_satisfy_the_schema(schema, defaults):
    for values in SCENARIOS.values():
        jsonschema.validate(merge(defaults, values), schema, cls=jsonschema.Draft7Validator)


BAD_VALUES = {
    "unknown top-level key": {"replicaCount": 3},
    "unknown nested key": {"operator": {"standby": {"replicas": 3}}},
    "rbac scope": {"rbac": {"scope": "global"}},
    "namespace name": {"watchNamespaces": ["Team_A"]},
    "namespaces not a list": {"watchNamespaces": "team-a"},
    "gpu count negative": {"worker": {"gpu": {"count": -1}}},
    "gpu count string": {"worker": {"gpu": {"count": "1"}}},
    "gpu resource name": {"worker": {"gpu": {"resourceName": "nvidia gpu"}}},
    "pull policy": {"operator": {"image": {"pullPolicy": "Sometimes"}}},
    "digest": {"worker": {"image": {"digest": "sha256:abc"}}},
    "metrics port": {"operator": {"metrics": {"port": 70000}}},
    "standby flag": {"operator": {"standby": {"enabled": "yes"}}},
    "storage endpoint": {"storage": {"endpoint": "minio:9000"}},
    "toleration operator": {"worker": {"tolerations": [{"key": "k", "operator": "Maybe"}]}},
    "cpu quantity": {"operator": {"resources": {"requests": {"cpu": "lots"}}}},
    "log format": {"operator": {"logFormat": "xml"}},
    "verbose flag": {"operator": {"verbose": "on"}},
    "stage uid root": {"worker": {"runAsUser": 0}},
    "cache path": {"worker": {"modelCache": {"claimName": "models", "mountPath": "cache"}}},
    "node selector value": {"worker": {"nodeSelector": {"gpu": 1}}},
    "progress interval": {"operator": {"progress": {"intervalSeconds": -1}}},
    "progress rate": {"operator": {"progress": {"readsPerSecond": 0}}},
    "dashboard flag": {"operator": {"metrics": {"grafanaDashboard": {"enabled": "true"}}}},
    "dashboard label value": {"operator": {"metrics": {"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": 1}}}}},
    "dashboard namespace": {"operator": {"metrics": {"grafanaDashboard": {"namespace": "Monitoring"}}}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(chart, schema, defaults, case):
    bad = BAD_VALUES[case]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(merge(defaults, bad), schema, cls=jsonschema.Draft7Validator)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_notes_tell_how_to_apply_a_run(chart):
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["selfimprove/templates/NOTES.txt"]
    for text in ("kubectl", "apply -f", "get sir", "bestAdapter", "create secret generic s3-credentials"):
        assert text in notes
    notes = chart.render(SCENARIOS["namespaced-2"], name=RELEASE, namespace=NAMESPACE)["selfimprove/templates/NOTES.txt"]
    assert "team-a, team-b" in notes and "kubectl -n team-a apply" in notes
