"""macft: fine-tune small open LLMs on your own chat data and take home a verified GGUF."""

__version__ = "0.1.0"
