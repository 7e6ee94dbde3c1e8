"""The `train` stage: a LoRA adapter trained on this round's data.

Inputs: every JSONL file of `inputs.train` — kept sampled paths (`question`, `cot`, `answer`) or
labeled examples (`question`, `answer: "rationale #### N"`). Each row is rendered in every
format of `training.formats` (LMSI's four mixed formats by default; few-shot formats become
their zero-shot variants when the task has no exemplars) and trained with the loss on the
answer tokens only.

The adapter starts fresh from the base model every round (`training.from: base`, LLM2LLM's
finding) or continues the previous round's (`from: previous`, `model.adapter`, loaded trainable;
a round with no previous adapter starts fresh).

Outputs: `adapter/` (peft format: vLLM's LoRARequest and peft load it), `metrics.json` (loss,
learning rate, grad norm, tokens, wall time and the batch fingerprint of every step, per-epoch
throughput), `tensorboard/` (the same curves as TensorBoard event files, `training/events.py`). Summary
metrics: trainLoss, initialLoss, steps, examples, epochs, tokensPerSecond.

Preemption: a checkpoint is written to `<output>/_checkpoints/epoch-N/` after every epoch; a
restart of the same task resumes from the newest complete one (same step count, same data
order) instead of starting over. See `training/checkpoint.py`.

Several GPUs: with `gpus > 1` the stage prepares the data once, then re-launches itself as
`torchrun --standalone --nproc_per_node N -m selfimprove_workers.stages.train_worker JOB_DIR`
(what `accelerate launch --multi_gpu --num_processes N` runs underneath), one data-parallel
process per GPU (DDP through accelerate's `Accelerator`), and uploads what the main process wrote.
`SELFIMPROVE_TRAIN_PROCESSES=N` forces N processes (on CPU: gloo), to exercise that path
without GPUs. On CPU or one GPU, training runs in this process.

Several nodes (`nodes > 1`: the pods of one Indexed Job, or the local executor's processes):
every node prepares the data and launches torchrun with c10d rendezvous at
`$SELFIMPROVE_RDZV_ENDPOINT` (node 0's pod under the Job's headless Service), id
`$SELFIMPROVE_RDZV_ID` (the Job's name, one per attempt), `gpus` processes on each node; the node
index is `$JOB_COMPLETION_INDEX`. The node whose torchrun ran global rank 0 (c10d orders nodes by
address, not by index) uploads and commits; the others write nothing and report its committed
summary (`StageOutcome.follower`). Every rank uploads its own RNG state with each checkpoint,
so a retry on the same number of nodes restores each rank's stream.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..contract import RDZV_ENDPOINT_ENV, RDZV_ID_ENV, OutputName
from ..errors import BadInput, Terminated
from ..runtime import StageContext, StageOutcome
from ..training import checkpoint, events
from ..training.data import encode_examples, load_exemplars, load_training_rows, resolve_formats
from ..training.events import write_train_events

PROCESSES_ENV = "SELFIMPROVE_TRAIN_PROCESSES"
NODE_INDEX_ENV = "JOB_COMPLETION_INDEX"
METRICS = "metrics.json"
WORKER_MODULE = "selfimprove_workers.stages.train_worker"


def load_tokenizer(model_dir: Path, field: str = "model.base") -> Any:
    from transformers import AutoTokenizer

    if not model_dir.is_dir():
        raise BadInput(f"{field}: {model_dir} is not a model directory")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{field}: cannot load a tokenizer from {model_dir}: {exc}") from None


def run(ctx: StageContext) -> StageOutcome:
    task = ctx.task
    spec = task.training
    assert spec is not None
    # Data first: a bad line fails the stage before any model is downloaded or loaded.
    rows = load_training_rows(ctx.storage_for, task.inputs.train, task.prompting.answer_template)
    exemplars = load_exemplars(ctx.storage_for, task.prompting)
    model_dir = ctx.local_dir(task.model.base)
    tokenizer = load_tokenizer(model_dir)
    formats = resolve_formats(spec.formats, bool(exemplars))
    if formats != list(spec.formats):
        ctx.log.info(f"no few-shot exemplars: training formats {spec.formats} → {formats}")
    examples = encode_examples(rows, formats, task.prompting, tokenizer, spec.max_length, exemplars)
    stats = examples.stats
    ctx.log.info(
        f"{stats['rows']} rows × {len(formats)} formats → {stats['sequences']} sequences, "
        f"{stats['tokens']:,} tokens ({stats['truncated']} truncated, {stats['dropped']} dropped: "
        f"answer longer than maxLength {spec.max_length})"
    )

    init_adapter = None
    if spec.from_ == "previous":
        if task.model.adapter:
            init_adapter = str(ctx.local_dir(task.model.adapter))
        else:
            ctx.log.info("training.from is previous but there is no previous adapter: starting fresh")

    resume_dir = None
    latest = checkpoint.find_latest(ctx.storage, task.output, task.digest())
    if latest is not None:
        at = f"epoch {latest.epoch}" if latest.step is None else f"step {latest.step}"
        ctx.log.info(f"found the checkpoint of {at}: resuming from it")
        resume_dir = str(checkpoint.download(ctx.storage, latest, ctx.workdir / "resume"))

    from ..training.loop import TrainJob  # torch: only once the inputs are known to be good

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    job = TrainJob(
        task=task.wire(), model_dir=str(model_dir), init_adapter=init_adapter, resume_dir=resume_dir,
        out_dir=str(ctx.workdir / "out"), work_dir=str(ctx.workdir / "scratch"), pad_id=int(pad_id),
    )
    processes = _processes(task.gpus, ctx)
    if task.nodes > 1:
        outcome = _launch(job, examples, processes, ctx, rendezvous=_rendezvous(task.nodes))
        if outcome is None:
            # This node holds no global rank 0: that node uploads and commits; this one reports
            # the committed result once it exists (runtime.run_task, `follower`).
            ctx.log.info("training done on this node; global rank 0's node commits the outputs")
            return StageOutcome(follower=True)
    elif processes > 1:
        outcome = _launch(job, examples, processes, ctx)
    else:
        from ..training.loop import train

        outcome = train(job, examples)
    assert outcome is not None

    out = Path(job.out_dir)
    history = json.loads((out / "metrics.json").read_text())["history"]
    write_train_events(out / events.TRAIN_DIR, history)
    ctx.writer.upload_dir(OutputName.ADAPTER.rstrip("/"), out / "adapter")
    ctx.writer.upload_file(METRICS, out / "metrics.json")
    ctx.writer.upload_dir(events.TRAIN_DIR, out / events.TRAIN_DIR)
    return StageOutcome(
        metrics=outcome["metrics"],
        outputs={"adapter": OutputName.ADAPTER, "metrics": METRICS, "tensorboard": events.TRAIN_DIR + "/"},
        details=outcome["details"],
    )


def _processes(gpus: int, ctx: StageContext) -> int:
    forced = os.environ.get(PROCESSES_ENV)
    if forced:
        return max(1, int(forced))
    if gpus <= 1:
        return 1
    import torch

    visible = torch.cuda.device_count()
    if visible < gpus:
        ctx.log.warning(f"gpus is {gpus} but {visible} are visible: training with {max(1, visible)}")
    return max(1, min(gpus, visible))


def _rendezvous(nodes: int) -> tuple[int, int, str, str]:
    """(nodes, this node's index, endpoint, id) of a multi-node task, from the environment its
    Job (or the local executor) sets; a missing or bad value is BadInput naming the variable."""
    endpoint, rdzv_id = os.environ.get(RDZV_ENDPOINT_ENV), os.environ.get(RDZV_ID_ENV)
    if not endpoint or ":" not in endpoint:
        raise BadInput(f"{RDZV_ENDPOINT_ENV}: {endpoint!r} is not host:port; nodes is {nodes}, and node 0's "
                       "rendezvous endpoint must be set")
    if not rdzv_id:
        raise BadInput(f"{RDZV_ID_ENV}: must be set (the Job's name) when nodes is {nodes}")
    text = os.environ.get(NODE_INDEX_ENV, "")
    try:
        index = int(text)
    except ValueError:
        raise BadInput(f"{NODE_INDEX_ENV}: {text!r} is not an integer (this node's index)") from None
    if not 0 <= index < nodes:
        raise BadInput(f"{NODE_INDEX_ENV}: {index} is out of range for nodes {nodes}")
    return nodes, index, endpoint, rdzv_id


def torchrun_command(job_dir: Path, processes: int, nodes: int = 1, node_rank: int = 0,
                     endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """The torchrun command line of one node. One node: `--standalone` (a local store). Several
    (the pods of an Indexed Job): c10d rendezvous at `endpoint` (index 0's host, which hosts the
    store) and `rdzv_id` the Job's name so that a retried Job never joins its predecessor's
    rendezvous. `--node_rank` is passed but c10d ignores it (torch/distributed/run.py warns so):
    the rendezvous numbers nodes by their sorted addresses (dynamic_rendezvous.py), so outputs must
    come from global rank 0 (`RANK`), whichever pod that is — on an Indexed Job `<job>-0.<svc>`
    sorts first."""
    if nodes <= 1:
        launch = ["--standalone"]
    else:
        if not endpoint or not rdzv_id:
            raise ValueError("several nodes need a rendezvous endpoint and id")
        launch = ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(processes),
            "-m", WORKER_MODULE, str(job_dir)]


def _launch(job: Any, examples: Any, processes: int, ctx: StageContext,
            rendezvous: tuple[int, int, str, str] | None = None) -> dict[str, Any] | None:
    """Run `train_worker` in `processes` data-parallel processes (on this node of `rendezvous`:
    nodes, index, endpoint, id); return the main process's outcome, or None when global rank 0
    ran on another node."""
    job_dir = ctx.workdir / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    job.save(job_dir / "job.json")
    examples.save(job_dir / "examples.npz")
    # torchrun is what `accelerate launch --multi_gpu` runs underneath; calling it directly works
    # the same on CPU (gloo), where accelerate would want MPI. `Accelerator` in each process
    # reads the rank and world size torchrun sets, and the precision comes from the code.
    if rendezvous is None:
        cmd = torchrun_command(job_dir, processes)
    else:
        nodes, index, endpoint, rdzv_id = rendezvous
        cmd = torchrun_command(job_dir, processes, nodes=nodes, node_rank=index, endpoint=endpoint, rdzv_id=rdzv_id)
    ctx.log.info(f"launching {processes} training processes: {' '.join(cmd[2:])}")
    # In a pod only PID 1 (this process) gets the kubelet's SIGTERM: hand it to torchrun, whose
    # agent forwards it to every training process; they stop together at a step boundary.
    proc = subprocess.Popen(cmd)
    forward = threading.current_thread() is threading.main_thread()  # handlers: main thread only
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if forward else None
    try:
        rc = proc.wait()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
    errors = sorted(job_dir.glob("error-*.json"))
    if errors:
        err = json.loads(errors[0].read_text())
        if err.get("reason") == "BadInput":
            raise BadInput(err["message"])
        if err.get("reason") == "Terminated":
            raise Terminated(err["message"])
        raise RuntimeError(f"training process failed: {err['message']}")
    if rc != 0:
        raise RuntimeError(f"training processes exited with code {rc}")
    outcome = Path(job.out_dir) / "outcome.json"
    if rendezvous is not None and not outcome.exists():
        return None  # the main process (global rank 0) is on another node
    return json.loads(outcome.read_text())
