"""Evaluation: benchmark formats (``benchmarks``), scoring (``evaluation``), the lmms-eval
adapter (``lmms_eval_adapter``) and training-run curves (``curves``)."""
