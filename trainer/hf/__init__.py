"""Hugging Face checkpoints in and out: config.json -> ModelConfig and per-layer patterns
(``config_map``), weights both ways (``weights``), and what a model exports as (``export_map``).
Nothing here imports ``transformers``: the directory is read as JSON and safetensors."""
