"""Worker stages. Each module exposes `run(ctx: StageContext) -> StageOutcome` and imports its
heavy libraries (torch, vllm, transformers, peft) inside functions, never at module level."""
