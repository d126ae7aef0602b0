"""splitfed: split federated LoRA fine-tuning of LLMs on heterogeneous devices."""

__version__ = "0.1.0"
