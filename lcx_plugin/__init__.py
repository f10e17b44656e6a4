"""lcx: long-context attention methods as a plugin backend for vLLM and SGLang."""

__version__ = "0.1.0"
