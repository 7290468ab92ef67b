"""splitpeft: split-learning LoRA fine-tuning of LLMs across heterogeneous devices."""

__version__ = "0.1.0"
