"""Benchmarks and planning: throughput against XTuner (``benchmark``), the memory planner
(``memory``) and model inspection on the meta device (``inspect``)."""
