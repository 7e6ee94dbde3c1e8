"""LoRA fine-tuning for the `train` stage.

`data` turns training files into token arrays (rendering, tokenizing, masking, truncation) and
plans the batches of each epoch; `checkpoint` stores and finds epoch checkpoints; `loop` is the
training loop itself (peft + accelerate). `data` and `checkpoint` import no torch, so the stage can
validate its inputs before the heavy libraries load; `loop` imports torch at module level and is
imported only where training runs.
"""
