"""Engine adapters: translation between an engine and lcx, nothing more."""
