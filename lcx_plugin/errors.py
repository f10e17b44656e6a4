"""The one error type for bad lcx configuration, shared by the config and every selector."""


class LcxConfigError(ValueError):
    """Raised once, at startup, for any bad lcx configuration."""


def user_path(text, what: str):
    """``text`` as a ``Path`` with ``~`` expanded; a ``~user`` this machine does not know is bad
    configuration (pathlib raises RuntimeError for it, ValueError for a name with a NUL byte)."""
    from pathlib import Path

    try:
        return Path(text).expanduser()
    except (RuntimeError, ValueError):
        raise LcxConfigError(f"{what} {str(text)!r}: its ~user is unknown on this machine") from None
