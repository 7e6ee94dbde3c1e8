"""The CPU demo: a tiny Llama that learns multi-term addition by teaching itself (LMSI).

`arithmetic` generates the task, `tinymodel` builds the model and tokenizer (also a test
fixture), `warmstart` trains the model to partial accuracy on a small labeled set. See
docs/demo-research.md for the measurements behind the default parameters.
"""
