"""Packaging rules from DESIGN.md: no `operator` module, workers import without GPU libraries."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def test_no_module_shadows_stdlib_operator():
    root = Path(__file__).resolve().parents[2]
    # The folder is named operator/ by the product's layout; it must never become a package.
    assert not (root / "operator" / "__init__.py").exists()
    for cwd in (root, Path("/")):  # from the repo root (on sys.path) and from elsewhere
        proc = subprocess.run(
            [sys.executable, "-c", "import operator, selfimprove_operator, sysconfig;"
             "assert operator.__file__.startswith(sysconfig.get_paths()['stdlib']), operator.__file__;"
             "assert hasattr(operator, 'itemgetter')"],
            capture_output=True, text=True, cwd=cwd, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr


def test_console_script_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert eps["selfimprove"] == "selfimprove_operator.cli:main"


def test_workers_and_control_plane_import_without_gpu_libraries():
    # A meta-path hook makes torch & co. unimportable, as in the operator image.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'vllm', 'transformers', 'peft', 'accelerate'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import selfimprove_workers, selfimprove_workers.contract, selfimprove_workers.spec\n"
        "import selfimprove_workers.storage, selfimprove_workers.data, selfimprove_workers.runtime\n"
        "import selfimprove_workers.prompts\n"
        "import selfimprove_operator.api, selfimprove_operator.crd, selfimprove_operator.cli, selfimprove_operator.presets\n"
        "import selfimprove_operator.manifest\n"
        "assert not any(m.split('.')[0] in {'torch','vllm','transformers','peft'} for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_workers_never_import_the_control_plane():
    root = Path(__file__).resolve().parents[2] / "workers"
    pattern = re.compile(r"^\s*(from|import)\s+selfimprove_operator", re.M)
    offenders = [str(p) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
