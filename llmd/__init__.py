"""llmd: a local LLM model daemon for one GPU host."""

__version__ = "0.1.0"
