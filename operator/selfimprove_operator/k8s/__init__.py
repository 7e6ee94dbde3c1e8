"""The Kubernetes executor: the planner's loop (observe → plan → persist status → act) driven by
kopf, with one batch/v1 Job per stage attempt.

- `config`: operator settings (environment and `selfimprove operator` flags).
- `bodies`: typed views (TypedDicts) of the raw Job, Pod and run bodies the controller reads.
- `jobs`: the Job of a stage attempt (pure).
- `observe`: Jobs and Pods → the planner's `Observed` (pure).
- `desired`: which Jobs a planned status wants created or deleted (pure).
- `status`: the JSON patch that writes the planner's status (pure).
- `kube`: the few API calls the controller makes, over kopf's authenticated client.
- `cache`: what the watches said about runs, their Jobs and Pods (`RunState`), fed by kopf.
- `workqueue`: per-run serialised reconciles with delayed requeues.
- `reconciler`: one reconcile of one run, returning when to look again (`Result`).
- `status_writer`: the resourceVersion-guarded status write and its conflict handling.
- `actuator`: creating and deleting stage Jobs.
- `events`: the run's core/v1 Events and their background posting.
- `metrics`, `metrics_server`: Prometheus metrics and their HTTP endpoint.
- `controller`: the composition of the above (cache feeds, workers applying results).
- `handlers`: the kopf registry and settings; `run_operator` is the CLI's entry point.
"""
