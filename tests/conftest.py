import os

# The Triton interpreter must be chosen before any @triton.jit decorator runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
