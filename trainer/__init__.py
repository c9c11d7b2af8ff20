"""trainer: train GPT-style language models with Hydra configs, webdataset shards and DeepSpeed ZeRO."""

__version__ = "0.1.0"
