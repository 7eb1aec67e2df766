"""VIST2: a decoder LLM that keeps its long context as pictures of text."""

__version__ = "0.1.0"
