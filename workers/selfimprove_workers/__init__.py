"""selfimprove's data plane: the stage contract, storage and the worker stages.

Importing this package must not import torch, transformers or vllm: the operator image installs
it for the contract alone. Stages import their heavy libraries inside the stage functions.
"""

__version__ = "0.1.0"
