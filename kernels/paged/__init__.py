"""Paged attention for prefill, chunked prefill and decode, dense or over a selection."""
from . import formats
from .api import paged_attention
from .formats import KVFormat
from .plan import BatchPlan
from .selection import Selection

__all__ = ["BatchPlan", "KVFormat", "Selection", "formats", "paged_attention"]
