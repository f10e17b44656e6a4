"""Attention kernels over a paged KV cache.

Nothing here imports an engine: the kernels see tensors only. Each kernel has a
Triton implementation (the GPU path), a torch twin with the same signature (the
CPU path) and a float64 reference used only by the tests.
"""
