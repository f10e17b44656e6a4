"""A/B evaluation helpers: deterministic long-context tasks and paired statistics."""
