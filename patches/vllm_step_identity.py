"""Tell lcx which request each batch row of a step is, and which requests ended.

Replaces: ``GPUModelRunner.execute_model`` (inherited by vLLM's CPUModelRunner), wrapped.
Why: the attention metadata carries no request ids, and rows move between steps (finished
requests are condensed away, batches are reordered), so per-request state (selection caches)
cannot be keyed by row. The wrapper keeps the runner and the step's SchedulerOutput in a
thread-local for the duration of the step; the metadata builder reads ``input_batch.req_ids``
and the scheduler's finished/preempted/resumed sets through ``compat.batch_identity``.
Supported: vLLM >=0.32,<0.33. Applied in every process by the plugin entry point, when the
runner's module is imported (``_on_import``): vLLM's API server and engine core never import it.
"""
from __future__ import annotations

from lcx_plugin.attention_backends.vllm import compat

from ._on_import import when_imported

NAME = "vllm_step_identity"


def apply() -> None:
    """Idempotent; refuses outside the supported vLLM versions. Wraps the runner now if its module
    is imported, otherwise as soon as it is."""
    compat.check_version(NAME)
    when_imported(compat.MODEL_RUNNER_MODULE, lambda module: _wrap(compat.model_runner_class()))


def _wrap(runner_cls) -> None:
    if getattr(runner_cls.execute_model, "_lcx_wrapped", False):
        return
    original = runner_cls.execute_model

    def execute_model(self, scheduler_output, *args, **kwargs):
        compat.set_step(self, scheduler_output)
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            compat.set_step(None, None)

    execute_model._lcx_wrapped = True
    execute_model.__wrapped__ = original
    runner_cls.execute_model = execute_model


def is_applied() -> bool:
    return getattr(compat.model_runner_class().execute_model, "_lcx_wrapped", False)
