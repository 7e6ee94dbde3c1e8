"""Model references: `hf://ORG/NAME[@REVISION]` validated by the models and by the API server's
CEL rule alike, resolved from a populated Hugging Face cache offline, and HF_TOKEN handled as a
credential."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hf_cache import populate_hf_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from selfimprove_operator.api import SelfImproveRun
from selfimprove_workers.errors import BadInput
from selfimprove_workers.model_refs import fetch_hf, hf_ref_problem, parse_hf_ref
from selfimprove_workers.redaction import redact

EXAMPLE = yaml.safe_load(Path("examples/lmsi-gsm8k.yaml").read_text())
COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
GOOD = ["hf://Qwen/Qwen2.5-7B-Instruct", "hf://Qwen/Qwen2.5-7B-Instruct@main", f"hf://meta-llama/Llama-3.1-8B-Instruct@{COMMIT}",
        "hf://gpt2", "hf://org_1/name.v2-x@v1.0", "hf://org/name@refs/pr/1"]
BAD = ["hf://", "hf://a/b/c", "hf://a--b/c", "hf://org/name@", "hf://org/name@a b", "hf://-x/y", "hf://x./y",
       "hf://org/na me", "hf://org/name@x@y", "hf://" + "a" * 97]


def with_base(base: str) -> dict:
    run = copy.deepcopy(EXAMPLE)
    run["spec"]["model"]["base"] = base
    return run


@pytest.mark.parametrize("ref", GOOD)
def test_good_references(ref, served_crd):
    SelfImproveRun.model_validate(with_base(ref))
    assert hf_ref_problem(ref) is None
    assert served_crd.admit(with_base(ref))[2] == []


@pytest.mark.parametrize("ref", BAD)
def test_a_malformed_reference_is_refused_with_the_field_named(ref, served_crd):
    with pytest.raises(ValidationError) as exc:
        SelfImproveRun.model_validate(with_base(ref))
    [err] = exc.value.errors()
    assert err["loc"] == ("spec", "model", "base") and "hf://ORG/NAME" in err["msg"], err
    causes = served_crd.admit(with_base(ref))[2]
    assert [c.field for c in causes] == ["spec.model.base"] and "hf://ORG/NAME" in causes[0].message


def test_paths_and_object_store_uris_are_not_hub_references():
    for ref in ["s3://models/qwen/", "file:///models/x", "/mnt/models/x", "models/hf:/x"]:
        assert hf_ref_problem(ref) is None
        SelfImproveRun.model_validate(with_base(ref))
    assert parse_hf_ref("hf://Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert parse_hf_ref(f"hf://Qwen/x@{COMMIT}") == ("Qwen/x", COMMIT)


@pytest.fixture(scope="module")
def served_crd():
    from crd_semantics import CustomResourceSchema
    from k8s_fixtures import CRD_FILE

    return CustomResourceSchema(yaml.safe_load(CRD_FILE.read_text()))


@pytest.fixture()
def offline_cache(tiny_model_dir, tmp_path, monkeypatch) -> tuple[Path, str]:
    cache = tmp_path / "hub"
    commit = populate_hf_cache(cache, "selfimprove-tests/tiny-llama", tiny_model_dir, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, commit


@pytest.mark.parametrize("rev", ["", "@main", "@v1", "@commit"])
def test_a_hub_model_resolves_from_a_populated_cache_offline(offline_cache, tiny_model_dir, tmp_path, rev):
    cache, commit = offline_cache
    uri = "hf://selfimprove-tests/tiny-llama" + (f"@{commit}" if rev == "@commit" else rev)
    path = fetch_hf(uri, tmp_path / "model-cache")
    assert path == cache / "models--selfimprove-tests--tiny-llama" / "snapshots" / commit
    assert json.loads((path / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(path)).model_type == "llama"
    assert not (tmp_path / "model-cache").exists()  # nothing copied: the cache is the copy


def test_the_stage_context_fetches_hub_references(offline_cache, tmp_path, monkeypatch):
    from selfimprove_workers.runtime import StageContext

    _, commit = offline_cache
    ctx = StageContext.__new__(StageContext)  # local_dir reads no other state for hf://
    monkeypatch.setenv("SELFIMPROVE_CACHE", str(tmp_path / "mc"))
    assert ctx.local_dir("hf://selfimprove-tests/tiny-llama").name == commit


def test_without_the_model_in_the_cache_offline_the_error_names_the_reference(offline_cache, tmp_path):
    with pytest.raises(BadInput, match=r"hf://selfimprove-tests/other: not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        fetch_hf("hf://selfimprove-tests/other", tmp_path)
    with pytest.raises(BadInput, match="not in the Hugging Face cache"):
        fetch_hf("hf://selfimprove-tests/tiny-llama@v2", tmp_path)


def test_an_interrupted_download_is_not_taken_for_a_model(offline_cache, tmp_path):
    cache, commit = offline_cache
    snapshot = cache / "models--selfimprove-tests--tiny-llama" / "snapshots" / commit
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(BadInput, match="not in the Hugging Face cache"):
        fetch_hf("hf://selfimprove-tests/tiny-llama", tmp_path)


def test_hf_tokens_are_credentials(monkeypatch):
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert token not in redact(f"401 for https://huggingface.co/api/models/x with Authorization: Bearer {token}")
    assert redact(f"token={token}") == "token=***"
    monkeypatch.setenv("HF_TOKEN", "a-token-of-another-shape")
    assert "a-token-of-another-shape" not in redact("download failed: a-token-of-another-shape")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.text(alphabet="aZ9_-./@ ", max_size=24))
def test_the_models_and_the_api_server_agree_on_every_reference(served_crd, tail):
    ref = "hf://" + tail
    python_ok = hf_ref_problem(ref) is None
    causes = [c for c in served_crd.admit(with_base(ref))[2] if c.field == "spec.model.base"]
    assert python_ok == (not causes), (ref, causes)
