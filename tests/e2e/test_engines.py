"""The two inference engines on the tiny model: the same interface, the same numbers.

One vLLM engine and one transformers engine serve the whole module (vLLM takes ~20 s to start
on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_fixtures import require_vllm
from selfimprove_workers.engines import load_engine
from selfimprove_workers.engines.base import GenerationParams, encode_prompt, prompt_seed
from selfimprove_workers.errors import BadInput
from selfimprove_workers.spec import EngineSpec

PROMPTS = ["Question: What is 2 plus 3?\nAnswer:", "Question: Tom has 4 apples.\nAnswer:",
           "Question: 7 times 6?\nAnswer:"]
COMPLETIONS = [" 2 + 3 = 5.\nThe answer is 5.", " He has 4.", " 7 * 6 = 42.\nThe answer is 42."]
SAMPLED = GenerationParams(n=4, temperature=0.9, top_p=0.95, max_tokens=20, seed=11, stop=("\nQuestion:",))


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir: Path):
    engine = load_engine(EngineSpec(kind="transformers"), tiny_model_dir, gpus=0, seed=0, enable_lora=True)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir: Path):
    require_vllm()
    engine = load_engine(EngineSpec(kind="vllm"), tiny_model_dir, gpus=0, seed=0, enable_lora=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request: pytest.FixtureRequest):
    return request.getfixturevalue("hf_engine" if request.param == "transformers" else "vllm_engine")


def _texts(outputs) -> list[list[str]]:
    return [[c.text for c in o.completions] for o in outputs]


def test_generate_shapes_and_counts(engine) -> None:
    outputs = engine.generate(PROMPTS, SAMPLED)
    assert [o.prompt for o in outputs] == PROMPTS
    assert all(len(o.completions) == SAMPLED.n for o in outputs)
    assert [o.prompt_tokens for o in outputs] == [len(encode_prompt(engine.tokenizer, p)) for p in PROMPTS]
    for o in outputs:
        for c in o.completions:
            assert 1 <= c.tokens <= SAMPLED.max_tokens
            assert c.finish_reason in ("stop", "length")
            assert "\nQuestion:" not in c.text
            if c.finish_reason == "length":
                assert c.tokens == SAMPLED.max_tokens
    # Sampling at T = 0.9 from a random model: the paths of a prompt differ.
    assert all(len(set(t)) > 1 for t in _texts(outputs))
    assert engine.generate([], SAMPLED) == []


def test_sampling_is_deterministic_per_seed(engine) -> None:
    first = _texts(engine.generate(PROMPTS, SAMPLED))
    assert _texts(engine.generate(PROMPTS, SAMPLED)) == first
    other = GenerationParams(**{**SAMPLED.__dict__, "seed": 12})
    assert _texts(engine.generate(PROMPTS, other)) != first


def test_progress_reports_the_end(engine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(PROMPTS, SAMPLED, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (len(PROMPTS) * SAMPLED.n, len(PROMPTS) * SAMPLED.n)


@pytest.mark.vllm
def test_vllm_generates_in_bounded_chunks_with_the_same_result(vllm_engine, monkeypatch) -> None:
    """Splitting one generation into several LLM.generate calls (to bound what vLLM holds)
    changes nothing: per-prompt seeds, order and progress are those of the whole."""
    import selfimprove_workers.engines.vllm_engine as module

    whole = _texts(vllm_engine.generate(PROMPTS, SAMPLED))
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(module, "GENERATE_CHUNK", SAMPLED.n)  # one prompt per call
    chunked = vllm_engine.generate(PROMPTS, SAMPLED, progress=lambda done, total: calls.append((done, total)))
    assert _texts(chunked) == whole and [o.prompt for o in chunked] == PROMPTS
    total = len(PROMPTS) * SAMPLED.n
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (total, total)
    assert {t for _, t in calls} == {total}


@pytest.mark.vllm
def test_vllm_on_cpu_runs_its_engine_core_in_the_stage_process_unless_werkzeug_is_loaded(tiny_model_dir) -> None:
    """A fresh process (a stage) starts the engine core in-process; one that holds werkzeug's
    context proxies (as this test process does, for moto) keeps vLLM's own engine process, which
    is the only way vLLM starts there at all. Both generate the same greedy text."""
    require_vllm()
    import json
    import os
    import subprocess
    import sys

    script = (
        "import contextvars, json, sys\n"
        "if sys.argv[2] == 'werkzeug':\n"
        "    import werkzeug.local\n"
        "    proxy = werkzeug.local.LocalProxy(contextvars.ContextVar('app'))  # unbound, like flask's\n"
        "from selfimprove_workers.engines import load_engine\n"
        "from selfimprove_workers.engines.base import GenerationParams\n"
        "from selfimprove_workers.spec import EngineSpec\n"
        "engine = load_engine(EngineSpec(kind='vllm'), sys.argv[1], gpus=0, seed=0, enable_lora=False)\n"
        "out = engine.generate([sys.argv[3]], GenerationParams(n=1, temperature=0.0, max_tokens=8))\n"
        "print(json.dumps({'in_process': engine.in_process, 'text': out[0].completions[0].text}))\n"
        "engine.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    results = {}
    for mode in ("plain", "werkzeug"):
        proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), mode, PROMPTS[0]], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["plain"]["in_process"] is True and results["werkzeug"]["in_process"] is False
    assert results["plain"]["text"] == results["werkzeug"]["text"]


def test_a_prompt_longer_than_the_context_is_bad_input(engine) -> None:
    long_prompt = "x" * (engine.max_model_len + 10)
    with pytest.raises(BadInput, match="context"):
        engine.generate([long_prompt], GenerationParams(max_tokens=4))


def test_per_prompt_seeds_are_spread() -> None:
    seeds = [prompt_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**62 for s in seeds)
    # vLLM gives a prompt's n paths the seeds s..s+n-1: no two prompts may share any of them.
    assert min(np.diff(sorted(seeds))) > 1024
    assert prompt_seed(0, 5) == prompt_seed(0, 5) != prompt_seed(1, 5)


@pytest.mark.vllm
def test_engines_agree(hf_engine, vllm_engine) -> None:
    """Same model in fp32: greedy text, token counts and losses match; embeddings are shared."""
    greedy = GenerationParams(n=2, temperature=0.0, max_tokens=12)
    a, b = hf_engine.generate(PROMPTS, greedy), vllm_engine.generate(PROMPTS, greedy)
    assert _texts(a) == _texts(b)
    assert [[c.tokens for c in o.completions] for o in a] == [[c.tokens for c in o.completions] for o in b]
    for add_eos in (False, True):
        la = hf_engine.completion_losses(PROMPTS, COMPLETIONS, add_eos=add_eos)
        lb = vllm_engine.completion_losses(PROMPTS, COMPLETIONS, add_eos=add_eos)
        assert np.allclose(la, lb, atol=1e-3), (la, lb)
    # A random model over ~100 tokens: losses near ln(101) = 4.6.
    assert all(3.5 < x < 6 for x in la)
    ea, eb = np.array(hf_engine.embed(["hello", "world"])), np.array(vllm_engine.embed(["hello", "world"]))
    assert np.allclose(ea, eb, atol=1e-5)


def test_completion_losses_by_hand(hf_engine) -> None:
    """The mean NLL over completion tokens only, from a plain forward pass."""
    import torch

    tok, model = hf_engine.tokenizer, hf_engine.model
    p = encode_prompt(tok, PROMPTS[0])
    c = tok(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad(), hf_engine._activate(None):  # the base model, whatever adapter is loaded
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    expected = -float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))) / len(c)
    assert hf_engine.completion_losses(PROMPTS[:1], COMPLETIONS[:1])[0] == pytest.approx(expected, abs=1e-5)


def test_embeddings_are_normalized_mean_pools(engine) -> None:
    vecs = np.array(engine.embed(["hello there", "a much longer text about apples", "hello there"]))
    assert vecs.shape == (3, 128)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    # Padding does not leak in: a text embeds the same alone and next to a longer one.
    assert np.allclose(engine.embed(["hello there"])[0], vecs[0], atol=1e-5)


def test_adapter_changes_generation_not_base_scores(hf_engine, tiny_adapter_dir: Path) -> None:
    greedy = GenerationParams(n=1, temperature=0.0, max_tokens=12)
    base = _texts(hf_engine.generate(PROMPTS, greedy))
    tuned = _texts(hf_engine.generate(PROMPTS, greedy, adapter=str(tiny_adapter_dir)))
    assert tuned != base
    assert _texts(hf_engine.generate(PROMPTS, greedy)) == base  # the adapter is off again
    # Losses and embeddings are always the base model's (IWSI, LTD), adapter loaded or not.
    before = hf_engine.completion_losses(PROMPTS, COMPLETIONS)
    hf_engine.generate(PROMPTS[:1], greedy, adapter=str(tiny_adapter_dir))
    assert hf_engine.completion_losses(PROMPTS, COMPLETIONS) == pytest.approx(before, abs=1e-6)
