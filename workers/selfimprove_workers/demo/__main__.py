"""`python -m selfimprove_workers.demo prepare --seed N --out DIR`: the demo's data and model.

Writes the three splits (warm-start labeled, unlabeled, held-out labeled) and the warm-started
tiny Llama under DIR, both cached: a second call with the same parameters returns at once.
Prints one JSON line with the paths and the warm-start metrics. Run as its own process so that
`selfimprove demo` (the control plane) never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arithmetic import TaskConfig, write_splits
from .warmstart import warm_start

# The settings measured in docs/demo-research.md: a warm-started model whose majority vote over
# sampled paths clearly beats its own greedy answer, which is the gap LMSI turns into greedy
# accuracy. The warm-start stops once greedy accuracy on the small labeled dev split reaches
# `target_accuracy` (checked every `eval_every` steps, half as often far below it); `steps` only
# bounds it. A fixed step count would not do: the tiny model learns the task in a sudden
# transition whose timing varies with the seed (1,000 to 2,800 steps at batch 32 on seeds 0-9),
# so the same 2,400 steps left seed 0 at 61% and seed 1 at 87%, and only a partial accuracy
# leaves LMSI room to show a gain. Batch 32 rather than 16: seed 3 needed 38k examples to the
# target instead of 62k, and an example costs ~30% less at that size on 2 cores.
DEFAULTS = {
    "n_warm": 2000,
    "n_unlabeled": 400,
    "n_eval": 300,
    "n_dev": 150,
    "steps": 4000,
    "target_accuracy": 0.5,
    "eval_every": 100,
    "lr": 3e-3,
    "batch_size": 32,
    "model": {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "max_positions": 256},
    "task": {"min_terms": 4, "max_terms": 6, "min_value": 1, "max_value": 9},
}


def prepare(seed: int, out: Path, params: dict | None = None) -> dict:
    p = {**DEFAULTS, **(params or {})}
    data = out / "data"
    splits = write_splits(data, seed, p["n_warm"], p["n_unlabeled"], p["n_eval"], TaskConfig(**p["task"]),
                          n_dev=p["n_dev"])
    target = p["target_accuracy"]
    metrics = warm_start(
        out / "model", splits["warmstart"], steps=p["steps"], lr=p["lr"], batch_size=p["batch_size"],
        seed=seed, model_kwargs=p["model"], log_every=p["eval_every"] if target else max(1, p["steps"] // 10),
        dev_data=splits.get("dev") if target else None, target_accuracy=target, eval_every=p["eval_every"],
    )
    return {"model": str(out / "model"), "data": {k: str(v) for k, v in splits.items()}, "warmStart": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfimprove_workers.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the demo's data and warm-started model (cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--params", default="{}", help="JSON overriding DEFAULTS (tests use a small setup)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo prints its own progress, one line per check
    try:
        result = prepare(args.seed, args.out, json.loads(args.params))
    except KeyboardInterrupt:  # Ctrl-C in `selfimprove demo`; it reports the interruption
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
