"""The Kubernetes executor: the planner's loop (observe → plan → persist status → act) driven by
kopf, with one batch/v1 Job per stage attempt.

- `config`: operator settings (environment and `selfimprove operator` flags).
- `jobs`: the Job of a stage attempt (pure).
- `observe`: Jobs and Pods → the planner's `Observed` (pure).
- `status`: the JSON patch that writes the planner's status (pure).
- `kube`: the few API calls the controller makes, over kopf's authenticated client.
- `workqueue`: per-run serialised reconciles with delayed requeues.
- `controller`: caches of runs/Jobs/Pods and the reconcile loop.
- `handlers`: the kopf registry and settings; `run_operator` is the CLI's entry point.
- `metrics`: Prometheus metrics.
"""
