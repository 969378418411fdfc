"""slm: train your own small GPT, on a laptop CPU first, then on Modal's GPUs."""

__version__ = "0.1.0"
