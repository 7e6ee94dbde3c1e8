"""The Helm chart's values scenarios and rendering by Helm's own engine (helm-python-sdk), shared by
the chart tests and the official-schema tests."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "selfimprove"
RELEASE, NAMESPACE = "si", "selfimprove-system"

SCENARIOS: dict[str, dict] = {
    "default": {},
    "namespaced-2": {"rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a", "team-b"]},
    "namespaced-release-ns": {"rbac": {"scope": "namespaced"}},
    "standby": {"operator": {"standby": {"enabled": True}}},
    "standby-namespaced": {
        "operator": {"standby": {"enabled": True}},
        "rbac": {"scope": "namespaced"}, "watchNamespaces": ["team-a", "team-b"],
    },
    "cluster-rbac-some-namespaces": {"watchNamespaces": ["team-a"], "operator": {"standby": {"enabled": True}}},
    "servicemonitor": {"operator": {"metrics": {"port": 9090, "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}},
    "grafana-dashboard": {"operator": {"metrics": {"grafanaDashboard": {
        "enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "selfimprove"}}}}},
    "custom-gpu": {
        "worker": {
            "gpu": {"resourceName": "amd.com/gpu", "count": 2},
            "nodeSelector": {"gpu.vendor": "amd"},
            "tolerations": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "image": {"repository": "registry.local/worker", "tag": "", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
            "imagePullSecrets": ["regcred"],
        },
        "storage": {"endpoint": "http://minio.minio.svc:9000", "region": "eu-west-1", "secretName": "minio-creds"},
    },
    "existing-sa-no-service": {
        "serviceAccount": {"create": False, "name": "ops-sa"},
        "operator": {"metrics": {"service": {"enabled": False}}, "probes": {"enabled": False},
                     "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
    },
}

# apiVersion/kind -> (kubernetes client model, namespaced). Only what the chart may render.

def render(chart, values: dict | None = None, namespace: str = NAMESPACE) -> list[dict]:
    out = chart.render(values or {}, name=RELEASE, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


