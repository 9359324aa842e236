"""Ollama simulator internals: a test asset for llmd, never imported by llmd itself."""

VERSION = "0.33.0-rc2"
