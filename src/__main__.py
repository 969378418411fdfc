"""`python -m src ...` is the `slm` command (useful where the console script is not on PATH)."""

from src.cli import entry

entry()
