"""Shared test setup. Fixture modules live beside this file as plain modules."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# No test may reach a model hub: every model is built locally by a fixture.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from s3_fixtures import *  # noqa: E402,F401,F403

# moto's S3 server (Flask) runs inside this process, and werkzeug's context proxies stop vLLM's
# engine core from starting in-process (see engines/vllm_engine.py, `_inprocess_safe`). Loading
# them up front makes every vLLM engine built *in this process* keep its own engine process
# whatever the test order; stage processes the tests start are fresh and run it in-process, as
# in production.
try:
    import werkzeug.local  # noqa: E402,F401
except ImportError:  # pragma: no cover - a partial install without moto
    pass

try:  # written by the workers' tests; absent in a partial checkout
    from model_fixtures import *  # noqa: E402,F401,F403
except ImportError as exc:  # pragma: no cover
    if "model_fixtures" not in str(exc):
        raise

try:  # the Kubernetes API emulator and fake cluster of the operator's tests
    from k8s_fixtures import *  # noqa: E402,F401,F403
except ImportError as exc:  # pragma: no cover
    if "k8s_fixtures" not in str(exc):
        raise
