"""Shared test setup. The fixture modules live beside this file (on pytest's `pythonpath`, see
pyproject.toml) and are loaded as plugins, so a test names a fixture without importing it."""

import os

# No test may reach a model hub: every model is built locally by a fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# moto's S3 server (Flask) runs inside this process, and werkzeug's context proxies stop vLLM's
# engine core from starting in-process (see engines/vllm_engine.py, `_inprocess_safe`). Loading
# them up front makes every vLLM engine built *in this process* keep its own engine process
# whatever the test order; stage processes the tests start are fresh and run it in-process, as
# in production.
try:
    import werkzeug.local  # noqa: F401
except ImportError:  # pragma: no cover - a partial install without moto
    pass

# Each fixture module skips (or fails in CI) on its own when what it needs is not installed.
pytest_plugins = ["s3_fixtures", "model_fixtures", "train_fixtures", "k8s_fixtures", "bpe_fixtures", "endpoint_fixtures"]


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    """tests/unit, tests/integration and tests/e2e are also markers: `pytest -m unit`."""
    import pytest

    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"/tests/{kind}/" in str(item.path).replace("\\", "/"):
                item.add_marker(getattr(pytest.mark, kind))
