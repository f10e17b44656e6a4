"""Paged attention for prefill, chunked prefill and decode, dense or over a selection; and the
decode scoring pass (token and page logits) that selectors rank from."""
from . import formats, mixed, quant
from .api import paged_attention
from .formats import KVFormat
from .plan import BatchPlan
from .scoring import page_logits, token_logits
from .selection import Selection

__all__ = ["BatchPlan", "KVFormat", "Selection", "formats", "mixed", "page_logits", "quant", "paged_attention",
           "token_logits"]
