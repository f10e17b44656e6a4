"""What the harness's engine children import before their engines start (``zygote.PRELOAD``)."""
import torch  # noqa: F401
import transformers  # noqa: F401
import vllm  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401

import lcx_plugin.harness.batch  # noqa: F401
import lcx_plugin.harness.reliability  # noqa: F401
