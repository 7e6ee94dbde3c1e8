"""The demo's task generator and warm-start: splits, labels, the stopping rule, the cache.

Whether the demo improves its model is measured by bench/bench_demo.py (minutes of CPU); these
tests pin down what that measurement relies on: unlabeled questions carry no answer, splits never
share a question, worked answers are right, and the warm-start stops where it says it does.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from selfimprove_workers.demo.arithmetic import (
    TaskConfig,
    format_prompt,
    make_problem,
    parse_answer,
    read_jsonl,
    write_splits,
)


def test_worked_answers_add_up_in_the_drawn_order():
    rng = random.Random(0)
    orders = set()
    for _ in range(300):
        p = make_problem(rng, TaskConfig(4, 6, 1, 9))
        terms = [int(t) for t in re.findall(r"\d+", p["question"])]
        assert 4 <= len(terms) <= 6 and all(1 <= t <= 9 for t in terms)
        steps = re.findall(r"(\d+) \+ (\d+) = (\d+)", p["answer"])
        assert len(steps) == len(terms) - 1
        assert all(int(a) + int(b) == int(c) for a, b, c in steps)
        # each step carries the running sum on, and every term is used exactly once
        assert all(steps[i][2] == steps[i + 1][0] for i in range(len(steps) - 1))
        used = [int(steps[0][0])] + [int(b) for _, b, _ in steps]
        assert sorted(used) == sorted(terms)
        assert parse_answer(p["answer"]) == str(sum(terms)) == str(p["target"])
        orders.add(tuple(used) == tuple(terms))
    assert orders == {True, False}  # random order: the vote needs different paths to one answer


def test_fixed_order_and_distinct_terms():
    rng = random.Random(1)
    for _ in range(50):
        p = make_problem(rng, TaskConfig(3, 5, 1, 9, distinct=True, random_order=False))
        terms = [int(t) for t in re.findall(r"\d+", p["question"])]
        assert len(set(terms)) == len(terms)
        assert p["answer"].startswith(f"{terms[0]} + {terms[1]} = ")
    with pytest.raises(ValueError, match="distinct"):
        TaskConfig(4, 6, 1, 3, distinct=True)
    with pytest.raises(ValueError):
        TaskConfig(1, 3)


def test_splits_are_disjoint_unlabeled_has_no_answers_and_dev_leaves_others_unchanged(tmp_path):
    a = write_splits(tmp_path / "a", seed=3, n_warm=50, n_unlabeled=40, n_eval=30)
    b = write_splits(tmp_path / "b", seed=3, n_warm=50, n_unlabeled=40, n_eval=30, n_dev=20)
    assert set(a) == {"warmstart", "unlabeled", "unlabeled.answers", "eval"} and set(b) == set(a) | {"dev"}
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    rows = {name: read_jsonl(path) for name, path in b.items()}
    # The answer key (for the report's calibration plot only) answers exactly the unlabeled questions.
    key = rows.pop("unlabeled.answers")
    assert [(k["id"], k["question"]) for k in key] == [(r["id"], r["question"]) for r in rows["unlabeled"]]
    assert all(parse_answer(k["answer"]) == str(sum(map(int, re.findall(r"\d+", k["question"])))) for k in key)
    assert [len(rows[n]) for n in ("warmstart", "unlabeled", "eval", "dev")] == [50, 40, 30, 20]
    assert all(set(r) == {"id", "question"} for r in rows["unlabeled"])
    assert all(parse_answer(r["answer"]) for n in ("warmstart", "eval", "dev") for r in rows[n])
    questions = [r["question"] for split in rows.values() for r in split]
    assert len(questions) == len(set(questions))
    other = write_splits(tmp_path / "c", seed=4, n_warm=50, n_unlabeled=40, n_eval=30)
    assert other["eval"].read_bytes() != a["eval"].read_bytes()


def test_prompt_is_the_pipelines_zero_shot_prompt():
    from selfimprove_workers.prompts import render_prompt  # the stages' own prompt builder
    from selfimprove_workers.spec import TaskSpec

    task = TaskSpec.model_validate({"answer": {"type": "number"}, "cotTrigger": "", "chatTemplate": False})
    q = "What is 1 + 2 + 3 + 4?"
    assert render_prompt(task, q, "zeroShotCot") == format_prompt(q)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("data"), seed=0, n_warm=64, n_unlabeled=4, n_eval=4, n_dev=8)


TINY = dict(hidden=64, layers=1, heads=2, intermediate=64, max_positions=128)


def test_warm_start_learns_caches_and_retrains_when_anything_changes(tmp_path, splits):
    from selfimprove_workers.demo.warmstart import warm_start

    out = tmp_path / "model"
    first = warm_start(out, splits["warmstart"], steps=30, lr=5e-3, batch_size=8, model_kwargs=TINY)
    assert not first["cached"] and first["steps"] == 30 and (out / "model.safetensors").exists()
    assert first["final_loss"] < 3.0  # from ~ln(100) = 4.6 at random init: it learned something
    again = warm_start(out, splits["warmstart"], steps=30, lr=5e-3, batch_size=8, model_kwargs=TINY)
    assert again["cached"] and again["key"] == first["key"]
    other = warm_start(out, splits["warmstart"], steps=31, lr=5e-3, batch_size=8, model_kwargs=TINY)
    assert not other["cached"] and other["key"] != first["key"]
    assert not (tmp_path / "model.tmp").exists()


def test_warm_start_stops_at_the_first_check_that_reaches_the_target(tmp_path, splits):
    from selfimprove_workers.demo.warmstart import warm_start

    kw = dict(steps=12, batch_size=8, model_kwargs=TINY, dev_data=splits["dev"], eval_every=4)
    reached = warm_start(tmp_path / "a", splits["warmstart"], target_accuracy=0.0, **kw)
    assert reached["steps"] == 4 and reached["reached_target"] and [s for s, _ in reached["dev_curve"]] == [4]
    missed = warm_start(tmp_path / "b", splits["warmstart"], target_accuracy=1.0, **kw)
    assert missed["steps"] == 12 and not missed["reached_target"]
    # far below the target (a random model scores 0), checks come every 2 * eval_every
    assert [s for s, acc in missed["dev_curve"]] == [4, 8] and missed["dev_curve"][0][1] < 0.5
    with pytest.raises(ValueError, match="dev_data"):
        warm_start(tmp_path / "c", splits["warmstart"], target_accuracy=0.5, steps=4, model_kwargs=TINY)
    with pytest.raises(ValueError, match="row 0"):
        warm_start(tmp_path / "d", [{"question": "What is 1 + 2?"}], steps=1, model_kwargs=TINY)


def test_greedy_accuracy_scores_against_the_answer_key(tmp_path):
    """A model that can only say `#### 3` is right on exactly the rows whose answer is 3."""
    import torch
    from selfimprove_workers.demo.tinymodel import build_tiny_llama
    from selfimprove_workers.demo.warmstart import greedy_accuracy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_tiny_llama(tmp_path / "m", **TINY)
    tok, model = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)
    script = tok(" #### 3", add_special_tokens=False).input_ids + [tok.eos_token_id]

    class Scripted(torch.nn.Module):  # emits the script token by token, whatever the prompt
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            tail = torch.tensor(script[:max_new_tokens]).repeat(input_ids.shape[0], 1)
            return torch.cat([input_ids, tail], dim=1)

    rows = [{"question": "What is 1 + 2?", "answer": "1 + 2 = 3 #### 3"},
            {"question": "What is 2 + 2?", "answer": "2 + 2 = 4 #### 4"},
            {"question": "What is 2 + 1?", "answer": "2 + 1 = 3 #### 3"}]
    assert greedy_accuracy(Scripted(model), tok, rows) == pytest.approx(2 / 3)
    assert greedy_accuracy(Scripted(model), tok, []) == 0.0
    assert tok.padding_side == AutoTokenizer.from_pretrained(d).padding_side  # restored


def test_prepare_command_writes_everything_and_caches(tmp_path):
    params = json.dumps({"n_warm": 32, "n_unlabeled": 4, "n_eval": 4, "n_dev": 4, "steps": 4, "eval_every": 2,
                         "target_accuracy": 1.0, "model": TINY})
    cmd = [sys.executable, "-m", "selfimprove_workers.demo", "prepare", "--seed", "5", "--out", str(tmp_path),
           "--params", params]
    first = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert set(first["data"]) == {"warmstart", "unlabeled", "unlabeled.answers", "eval", "dev"}
    assert first["warmStart"]["steps"] == 4 and not first["warmStart"]["cached"]
    assert (tmp_path / "model" / "model.safetensors").exists()
    second = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert second["warmStart"]["cached"] and second["warmStart"]["key"] == first["warmStart"]["key"]


def test_ctrl_c_during_the_warm_start_exits_130_and_the_next_prepare_starts_clean(tmp_path):
    import signal
    import time

    base = {"n_warm": 32, "n_unlabeled": 4, "n_eval": 4, "n_dev": 4, "target_accuracy": None, "model": TINY}
    cmd = [sys.executable, "-m", "selfimprove_workers.demo", "prepare", "--seed", "1", "--out", str(tmp_path)]
    # SIGINT back to its default in the child: a test run started in the background (nohup, `&`)
    # passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([*cmd, "--params", json.dumps({**base, "steps": 10**6})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:  # whatever fails, never leave a million-step warm-start running behind the test
        deadline = time.time() + 120
        while not (tmp_path / "model.tmp" / "model.safetensors").exists():  # training has begun
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the warm-start never began"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not (tmp_path / "model").exists()  # nothing half-trained where a finished model goes

    done = subprocess.run([*cmd, "--params", json.dumps({**base, "steps": 3})], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["warmStart"]["steps"] == 3
    assert (tmp_path / "model" / "model.safetensors").exists() and not (tmp_path / "model.tmp").exists()
