"""One data-parallel training process: `python -m selfimprove_workers.stages.train_worker JOB_DIR`.

Started by the `train` stage through `accelerate launch` when a Job has several GPUs (never run
it by hand). JOB_DIR holds `job.json` (a `TrainJob`) and `examples.npz` (the tokenized data,
prepared once by the stage). The main process writes the adapter, `metrics.json` and
`outcome.json` into the job's `out_dir`; the stage uploads them and commits. A failure is
written to `JOB_DIR/error-<rank>.json` (`reason`: BadInput or Error) so the stage can report it
with the right exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .. import log
from ..errors import BadInput, Terminated
from ..redaction import redact

logger = logging.getLogger("selfimprove.train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log.setup()
    if len(argv) != 1:
        print("usage: python -m selfimprove_workers.stages.train_worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    rank = os.environ.get("RANK", "0")
    try:
        from ..training.data import EncodedExamples
        from ..training.loop import TrainJob, train

        train(TrainJob.load(job_dir / "job.json"), EncodedExamples.load(job_dir / "examples.npz"))
        return 0
    except BadInput as exc:
        reason, message, code = "BadInput", str(exc), 2
    except Terminated as exc:
        reason, message, code = "Terminated", str(exc), 143
    except Exception as exc:  # noqa: BLE001 — process boundary; the stage decides what it means
        logger.exception("training process failed")
        reason, message, code = "Error", f"{type(exc).__name__}: {exc}", 1
    (job_dir / f"error-{rank}.json").write_text(json.dumps({"reason": reason, "message": redact(message)}))
    return code


if __name__ == "__main__":
    sys.exit(main())
