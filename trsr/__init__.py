"""trsr: LLM-based text-rich sequential recommendation (LLM-TRSR, WWW 2024) on Ray."""

__version__ = "0.1.0"
