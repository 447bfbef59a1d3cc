"""GPTSAN: a general-purpose Japanese language model on a Switch Transformer."""

__version__ = "0.1.0"
