"""The served teacher and judge against a real vLLM OpenAI server (`served_tiny`, one per session):
the augment stage (LLM2LLM) and the judge filter run as Jobs run them, with `model.base` a path
that does not exist, so any attempt to load weights would fail the stage.

A random tiny model writes junk; vLLM's structured outputs (a regex, sent through the endpoint's
`extraBody` as any provider-specific field is) make it write the shapes the stage parses, so the
parsing, dedup, token accounting and retries all run on what the server really generated.

Cost on the shared 2-core machine: the server's start (~21-30 s, once per session) plus ~10 s per
stage process.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from endpoint_fixtures import Scripted, ScriptedProxy
from model_fixtures import run_worker, write_jsonl

pytestmark = pytest.mark.slow

WORD = "[a-z]{2,8}"
ITEM = rf"Question: [A-Z][a-z]{{2,8}}( {WORD}){{5,8}}\?\nAnswer: [A-Z][a-z]{{2,8}}( {WORD}){{2,5}}\.\n#### [1-9][0-9]{{0,2}}"
TWO_ITEMS = rf"1\. {ITEM}\n\n2\. {ITEM}"
SCORE = r"[0-5]\n[a-z]{1,6}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task(stage: str, out: Path, model: dict[str, Any], **body: Any) -> dict[str, Any]:
    # The base model does not exist: a stage that tried to load weights would fail on it.
    return {"run": {"name": "served"}, "round": 1, "stage": stage, "output": str(out),
            "model": {"base": str(out.parent / "no-such-model"), **model}, **body}


def test_augment_through_the_served_teacher_with_retries(served_tiny, tmp_path: Path):
    """LLM2LLM's teacher requests go to vLLM through a proxy that answers 429 (Retry-After: 1), then
    503, then forwards with 0.2 s added: every wrong example gets its two new examples, the tokens
    counted are the ones vLLM reported, two retries are recorded, at most maxConcurrency (2)
    requests were in flight."""
    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", [
        {"id": "s1", "question": "Ann has 3 apples and buys 4 more. How many apples?", "correct": False, "gold": "7"},
        {"id": "s2", "question": "A box holds 6 pens. How many pens are in 3 boxes?", "correct": False, "gold": "18"},
        {"id": "s3", "question": "Tom reads 5 pages a day. How many pages in 4 days?", "correct": False, "gold": "20"},
        {"id": "s4", "question": "What is 2 + 2?", "correct": True, "gold": "4"}])
    script = [Scripted(429, {"Retry-After": "1"}), Scripted(503)]
    with ScriptedProxy(served_tiny.url, script, delay=0.2) as proxy:
        endpoint = {"url": proxy.url, "model": served_tiny.model, "maxConcurrency": 2, "backoffSeconds": 0.1,
                    "extraBody": {"structured_outputs": {"regex": TWO_ITEMS}}}
        out = tmp_path / "augment"
        rc, summary, stderr = run_worker(task("augment", out, {"teacherEndpoint": endpoint},
                                              inputs={"predictions": str(predictions)},
                                              augment={"perExample": 2, "maxTokens": 400, "retries": 1}), tmp_path)
    assert rc == 0, stderr[-3000:]
    assert summary is not None
    m = summary["metrics"]
    assert (m["wrong"], m["requested"], m["augmented"], m["malformed"], m["duplicates"]) == (3, 6, 6, 0, 0), m
    rows = read_jsonl(out / "augmented.jsonl")
    assert sorted(r["source"] for r in rows) == ["s1", "s1", "s2", "s2", "s3", "s3"]
    assert all(r["question"].endswith("?") and "\n#### " in r["answer"] for r in rows)
    # Tokens: exactly what vLLM's answers said (the proxy summed their `usage`).
    assert proxy.usage["answers"] == 3
    assert (m["teacherPromptTokens"], m["teacherCompletionTokens"]) == (proxy.usage["prompt_tokens"],
                                                                        proxy.usage["completion_tokens"])
    assert m["teacherPromptTokens"] > 1000 and m["teacherCompletionTokens"] > 100
    assert (m["teacherHttpRequests"], m["teacherRetries"]) == (5, 2) == (len(proxy.arrivals), 2)
    served = json.loads((out / "result.json").read_text())["details"]["teacherEndpoint"]
    assert served["retriedBy"] == {"429": 1, "503": 1} and served["waitSeconds"] >= 1.0  # Retry-After honoured
    assert served["requests"] == 3 and served["url"] == proxy.url and served["model"] == served_tiny.model
    assert proxy.max_in_flight == 2
    assert "vLLM engine" not in stderr  # no local engine started


def _direct_score(served: Any, messages: list[dict[str, str]], regex: str = SCORE) -> str:
    """The served judge's reply to `messages`, asked directly (not through selfimprove's client)."""
    body = {"model": served.model, "messages": messages, "temperature": 0.0, "max_tokens": 8,
            "structured_outputs": {"regex": regex}}
    req = urllib.request.Request(served.url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_the_judge_filter_scores_through_the_served_judge(served_tiny, tmp_path: Path):
    from selfimprove_workers.selection import parse_score
    from selfimprove_workers.stages.filter import judge_messages

    samples = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "path": p, "text": f"{i} + {i} = {2 * i + p}. "
                "The answer is " + str(2 * i + p) + ".", "answer": str(2 * i + p)} for i in range(1, 4) for p in range(2)]
    votes = [{"id": f"q{i}", "majority": str(2 * i), "confidence": 0.5, "entropy": 0.5} for i in range(1, 4)]
    out = tmp_path / "filter"
    rc, summary, stderr = run_worker(task(
        "filter", out, {"judgeEndpoint": {"url": served_tiny.url, "model": served_tiny.model,
                                          "extraBody": {"structured_outputs": {"regex": SCORE}}}},
        inputs={"samples": str(write_jsonl(tmp_path / "samples.jsonl", samples)),
                "votes": str(write_jsonl(tmp_path / "votes.jsonl", votes))},
        filters=[{"judge": {"minScore": 0, "maxTokens": 8}}]), tmp_path)
    assert rc == 0, stderr[-3000:]
    assert summary is not None
    kept = read_jsonl(out / "kept.jsonl")
    assert len(kept) == 6
    # The stage sent exactly AlpaGasus's messages: a direct request with them gets the same score.
    for row in kept:
        expected = parse_score(_direct_score(served_tiny, judge_messages(row["question"], row["cot"])), 5.0)
        assert row["judgeScore"] == (expected if expected is not None else 0.0)
    m = summary["metrics"]
    assert m["judgeHttpRequests"] == 6 and m["judgeRetries"] == 0
    assert m["judgePromptTokens"] > 6 * 100 and m["judgeCompletionTokens"] >= 6 * 3
    step = json.loads((out / "result.json").read_text())["details"]["filters"][0]
    assert step["endpoint"]["requests"] == 6 and step["model"] == f"{served_tiny.url} ({served_tiny.model})"
    assert step["endpoint"]["promptTokens"] == m["judgePromptTokens"]
    assert "vLLM engine" not in stderr


@pytest.mark.parametrize("regex, kept", [(r"5\n[a-z]{1,6}", 6), (r"[45]\n[a-z]{1,6}", 0)], ids=["rated-5", "rated-4"])
def test_the_teachers_examples_pass_the_served_judge_at_alpagasus_threshold(served_tiny, tmp_path: Path, regex, kept):
    """LLM2LLM with `augment.filters: [judge minScore 4.5]`: the served teacher writes six items and
    the served judge rates each — as a direct request with AlpaGasus's messages rates it. The tiny
    random model's greedy choice does not depend on the prompt (it rates every item alike), so
    the two sides of 4.5 are two runs: structured to answer 5, every item is kept; allowed 4 or 5,
    it answers 4 and every item lands in rejected.jsonl with its score, the round adding nothing
    (a warning, not a failure)."""
    from selfimprove_workers.selection import parse_score
    from selfimprove_workers.stages.filter import judge_messages

    predictions = write_jsonl(tmp_path / "seed_predictions.jsonl", [
        {"id": "s1", "question": "Ann has 3 apples and buys 4 more. How many apples?", "correct": False, "gold": "7"},
        {"id": "s2", "question": "A box holds 6 pens. How many pens are in 3 boxes?", "correct": False, "gold": "18"},
        {"id": "s3", "question": "Tom reads 5 pages a day. How many pages in 4 days?", "correct": False, "gold": "20"}])
    teacher = {"url": served_tiny.url, "model": served_tiny.model, "extraBody": {"structured_outputs": {"regex": TWO_ITEMS}}}
    judge = {"url": served_tiny.url, "model": served_tiny.model, "extraBody": {"structured_outputs": {"regex": regex}}}
    out = tmp_path / "augment"
    rc, summary, stderr = run_worker(task("augment", out, {"teacherEndpoint": teacher, "judgeEndpoint": judge},
                                          inputs={"predictions": str(predictions)},
                                          augment={"perExample": 2, "maxTokens": 400, "retries": 0,
                                                   "filters": [{"judge": {"minScore": 4.5, "maxTokens": 8}}]}), tmp_path)
    assert rc == 0, stderr[-3000:]
    assert summary is not None
    rows, rejected = read_jsonl(out / "augmented.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert (len(rows), len(rejected)) == (kept, 6 - kept)
    for row in rows + rejected:
        direct = parse_score(_direct_score(served_tiny, judge_messages(row["question"], row["answer"]), regex), 5.0)
        assert direct is not None and row["judgeScore"] == direct and (row in rows) == (direct >= 4.5), row
    assert all(r["rejectedBy"] == "judge" and r["filterIndex"] == 0 for r in rejected)
    m = summary["metrics"]
    assert (m["augmented"], m["filteredOut"], m["judgeHttpRequests"]) == (kept, 6 - kept, 6), m
    [step] = json.loads((out / "result.json").read_text())["details"]["filters"]
    assert (step["kind"], step["in"], step["out"], step["minScore"]) == ("judge", 6, kept, 4.5)
    assert ("kept none of the 6 new examples" in stderr) == (kept == 0)
    assert "vLLM engine" not in stderr


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_the_served_prompt_is_the_local_prompt(served_tiny, api):
    """The teacher's messages reach the served model as the very token ids the local engines
    would generate from: through the server's chat template (`chat`), or as the plain transcript a
    model without one gets locally (`completions`). Counted through the client (`usage`), and
    compared id for id with vLLM's `return_token_ids`."""
    from selfimprove_workers.chat import render_messages
    from selfimprove_workers.constants import TEACHER_API_KEY_ENV
    from selfimprove_workers.endpoint_client import EndpointClient
    from selfimprove_workers.endpoints import Endpoint
    from selfimprove_workers.engines.base import encode_prompt
    from selfimprove_workers.stages.augment import teacher_messages
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(served_tiny.model_dir))
    messages = teacher_messages("Ann has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7", 2)
    local = encode_prompt(tok, render_messages(tok if api == "chat" else None, messages))
    endpoint = Endpoint(url=served_tiny.url, model=served_tiny.model, api=api, extra_body={"return_token_ids": True})
    with EndpointClient(endpoint, field="model.teacherEndpoint", api_key_env=TEACHER_API_KEY_ENV) as client:
        replies = client.chat([messages], temperature=0.0, max_tokens=4)
    assert len(replies) == 1 and client.stats.prompt_tokens == len(local)
    body = client._body(messages, 0.0, 4, None)
    req = urllib.request.Request(f"{served_tiny.url}{client.path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    ids = answer.get("prompt_token_ids") or answer["choices"][0].get("prompt_token_ids")
    assert ids == local
