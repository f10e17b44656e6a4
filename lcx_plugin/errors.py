"""The one error type for bad lcx configuration, shared by the config and every selector."""


class LcxConfigError(ValueError):
    """Raised once, at startup, for any bad lcx configuration."""
