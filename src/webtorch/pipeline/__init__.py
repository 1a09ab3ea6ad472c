"""Pipelines: named stages (Python functions over a batch, or served models) run as one graph,
each stage with its own queue, batching and placement (ARCHITECTURE.md: the pipeline layer)."""
