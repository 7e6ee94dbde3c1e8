"""A stand-in worker for the local executor's tests: the real runtime (task parsing, skip when
complete, commit protocol, termination log, exit codes) around a stage body that only writes
plausible metrics. Behaviour per stage comes from FAKE_STAGE_* environment variables."""

import os
import sys
import time

from selfimprove_workers import runtime
from selfimprove_workers.errors import BadInput
from selfimprove_workers.runtime import StageOutcome


def body(ctx) -> StageOutcome:
    stage, rnd = ctx.task.stage.value, ctx.task.round
    ledger = os.environ.get("FAKE_STAGE_LEDGER")
    shard = "" if ctx.shard is None else f":shard{ctx.shard}"
    if ledger:  # every stage body that really ran, for "no completed stage runs twice"
        with open(ledger, "a") as f:
            f.write(f"{rnd}:{stage}:{ctx.task.attempt}{shard}\n")
    if shard and os.environ.get("FAKE_STAGE_FAIL_SHARD") == f"{rnd}:{stage}{shard}" and ctx.task.attempt == 1:
        raise RuntimeError(f"shard {ctx.shard} lost its node")
    if os.environ.get("FAKE_STAGE_BAD") == f"{rnd}:{stage}":
        raise BadInput("data/questions.jsonl:7: missing \"question\"")
    if os.environ.get("FAKE_STAGE_FAIL") == f"{rnd}:{stage}" and ctx.task.attempt == 1:
        raise RuntimeError("transient trouble")
    sleep = float(os.environ.get(f"FAKE_STAGE_SLEEP_{stage.upper()}", "0"))
    for i in range(3):
        ctx.progress(i + 1, 3, "steps")
        time.sleep(sleep / 3)
    if ctx.shard is None:
        ctx.writer.write_jsonl("out.jsonl", [{"round": rnd, "stage": stage}])
    else:  # a shard's slice of ten rows, merged back in order by `merge`
        ctx.writer.write_jsonl("out.jsonl", [{"round": rnd, "stage": stage, "row": i}
                                             for i in ctx.shard_rows(list(range(10)))])
    metrics = body_metrics(stage, rnd)
    outputs = {"adapter": "adapter/"} if stage == "train" else {}
    return StageOutcome(metrics=metrics, outputs=outputs)


def merge(ctx, shard_dirs) -> StageOutcome:
    rows = runtime.concat_outputs(ctx, shard_dirs, "out.jsonl")
    stage = ctx.task.stage.value
    return StageOutcome(metrics={**body_metrics(stage, ctx.task.round), "rows": len(rows)})


def body_metrics(stage: str, rnd: int) -> dict:
    return {
        "sample": {"paths": 8, "questions": 2, "meanConfidence": 0.75},
        "filter": {"kept": 5},
        "train": {"trainLoss": 1.0 / (rnd + 1)},
        "evaluate": {"accuracy": round(0.2 + 0.1 * rnd, 3)},
        "augment": {"augmented": 1},
    }[stage]


if __name__ == "__main__":
    sys.exit(runtime.main([sys.argv[1]], stage_fn=body, merge_fn=merge))
