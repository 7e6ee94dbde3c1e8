"""selfimprove's control plane: the SelfImproveRun API, planner, executors and CLI."""

__version__ = "0.1.0"
