"""Inference and export: load a trained model, build prompts, generate; write and read
exported folders (``export``); import released checkpoints (``importers``)."""
