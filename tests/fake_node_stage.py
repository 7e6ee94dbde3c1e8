"""A stand-in worker for multi-node stages on the local executor: the real runtime around
tests/fake_stage.py's body, except that a task with nodes > 1 checks what each node gets (its
index, the rendezvous endpoint and id), records it, and behaves as a node of a real training
would: node 0 commits, the others return `follower` and report node 0's committed summary.

FAKE_NODE_LEDGER: the file each node appends `round:stage:attempt:node<k>:<rdzv id>:<endpoint>` to.
FAKE_NODE_FAIL=<attempt>:node<k>: that node fails; the other nodes then wait on their lost peer
(as a collective would) until the executor stops them."""

import os
import sys
import time

from fake_stage import body as plain_body
from fake_stage import merge
from selfimprove_workers import runtime
from selfimprove_workers.runtime import StageOutcome


def body(ctx) -> StageOutcome:
    task = ctx.task
    if task.nodes <= 1:
        return plain_body(ctx)
    k = int(os.environ["JOB_COMPLETION_INDEX"])
    endpoint, rdzv_id = os.environ["SELFIMPROVE_RDZV_ENDPOINT"], os.environ["SELFIMPROVE_RDZV_ID"]
    ledger = os.environ["FAKE_NODE_LEDGER"]
    with open(ledger, "a") as f:
        f.write(f"{task.round}:{task.stage.value}:{task.attempt}:node{k}:{rdzv_id}:{endpoint}\n")
    # The rendezvous: no node goes on before all have joined (else node 0 could commit before a
    # slower-starting node's runtime even looks, and that node would skip its body as complete).
    mine = f"{task.round}:{task.stage.value}:{task.attempt}:"
    deadline = time.monotonic() + 60
    while sum(line.startswith(mine) for line in open(ledger).read().split()) < task.nodes:
        if time.monotonic() > deadline:
            raise RuntimeError("the other nodes never joined the rendezvous")
        time.sleep(0.05)
    fail = os.environ.get("FAKE_NODE_FAIL", "")
    if fail == f"{task.attempt}:node{k}":
        time.sleep(0.5)
        raise RuntimeError("lost the connection to a peer")
    if fail.startswith(f"{task.attempt}:"):
        time.sleep(600)   # a collective waiting on the failed node
    return plain_body(ctx) if k == 0 else StageOutcome(follower=True)


if __name__ == "__main__":
    sys.exit(runtime.main([sys.argv[1]], stage_fn=body, merge_fn=merge))
