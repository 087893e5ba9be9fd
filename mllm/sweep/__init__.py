"""Backbone sweeps: a recipe over LLM bases and ``--set`` grids (``mllm sweep``)."""
