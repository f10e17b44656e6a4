"""Paged attention for prefill, chunked prefill and decode, dense or over a selection."""
from .layout import KVLayout, kv_planes, write_kv
from .selection import Selection
from .api import paged_attention

__all__ = ["KVLayout", "Selection", "kv_planes", "paged_attention", "write_kv"]
