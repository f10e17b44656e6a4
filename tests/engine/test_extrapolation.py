"""Length extrapolation through compacted positions, in the real engine on the embedded model.

* ``streaming`` with ``"extrapolate": true`` (sinks read right before the window, whatever the
  query's position) matches the float32 reference model read the same way, teacher-forced, in
  chunked prefill and decode, within the stock engine's own distance to the dense reference; and
  it is far from the same method at absolute positions, so the re-positioning really happens.
* ``hip`` with ``extrapolate`` (every layer selecting) matches the reference stating HiP's
  selection read at compacted positions.
* ``token_select`` with ``prefill: "select"`` and ``extrapolate`` (prompt blocks selecting from
  their mean query, position-neutral scores) matches the reference stating that selection, read
  at compacted positions.
* The startup refusal: a ``--max-model-len`` past the model's trained 8,192 positions with a
  method that cannot extrapolate stops the engine with one message; an extrapolating method starts.
"""
import pytest

from lcx_plugin.harness.batch import ArmSpec, run_arm
from lcx_plugin.harness.model import prepare

from .conftest import HIP_EXTRAPOLATE, STREAMING, TOKEN_SELECT_EXTRAPOLATE, gap, whole, within
from .reference_model import token_logprobs

pytestmark = pytest.mark.slow

#: What serving past the trained length takes in vLLM: the model config's length raised.
LONG = {"max_model_len": 16384, "hf_overrides": {"max_position_embeddings": 32768}}


def test_streaming_at_compacted_positions_matches_the_compacted_reference(arm, model_path, stock_yardstick_f32):
    lcx, log = arm("streaming_extrapolate")
    assert "lcx attention active: method=streaming" in log and "extrapolate=True" in log, log[-3000:]
    sink, window = STREAMING["sink"], STREAMING["window"]
    prefill, decode, absolute = [], [], []
    for i, ids in enumerate(lcx["prompt_token_ids"]):
        full = ids + lcx["token_ids"][i]
        ref = token_logprobs(model_path, full, sink, window, compact=True)
        prefill.append(gap(lcx["prompt_logprobs"][i][1:], ref[: len(ids) - 1]))
        decode.append(gap(lcx["logprobs"][i], ref[len(ids) - 1:]))
        absolute.append(gap(lcx["prompt_logprobs"][i][1:], token_logprobs(model_path, ids, sink, window)))
    yard = whole(stock_yardstick_f32)
    assert within(whole(prefill), yard), (prefill, yard)
    assert within(whole(decode), yard), (decode, yard)
    # Sinks at their absolute positions read differently (0.13 nats on average on a 900-token prompt
    # with 16 sinks and a 128-token window, float32): the engine is far from that reading.
    assert whole(absolute)["mean"] > 5 * whole(prefill)["mean"] + 0.02, (absolute, prefill)


def test_hip_at_compacted_positions_matches_the_compacted_reference(arm, model_path, stock_yardstick_f32):
    """HiP's own selections (query blocks in prefill, a search every decode step), every layer
    selecting, searched position-neutrally (bounds of un-rotated keys against un-rotated queries)
    and read at compacted positions: against the float32 reference stating the same selection and
    reading it the same way, prefill and decode together."""
    lcx, log = arm("hip_extrapolate")
    assert "lcx attention active: method=hip" in log and "extrapolate=True" in log, log[-3000:]
    ids, generated = lcx["prompt_token_ids"][0], lcx["token_ids"][0]
    cfg = HIP_EXTRAPOLATE
    spec = {"sink": cfg["sink"], "window": cfg["window"], "k": cfg["budget"] // 128, "bs": 128,
            "qb": cfg["query_block"], "dense_layers": [], "from": len(ids), "neutral": True}
    got = lcx["prompt_logprobs"][0][1:] + lcx["logprobs"][0]
    compacted = gap(got, token_logprobs(model_path, ids + generated, hip=spec, compact=True))
    assert within(compacted, whole(stock_yardstick_f32)), (compacted, stock_yardstick_f32)
    c = lcx["lcx_counters"]
    assert 0 < c["hip_pages_attended"] < c["hip_pages_held"], c  # it selected: positions really moved


def test_token_select_at_compacted_positions_matches_the_compacted_reference(arm, model_path, stock_yardstick_f32):
    """TokenSelect's own selections (a top-k per prompt block of 64 rows from its mean query, a
    fresh top-k every decode step), scored position-neutrally and read at compacted positions:
    against the float32 reference stating the same selection, prefill and decode together
    (that scoring ignores distance is shown at the selector level, tests/selectors)."""
    lcx, log = arm("token_select_extrapolate")
    assert "lcx attention active: method=token_select" in log and "extrapolate=True" in log, log[-3000:]
    ids, generated = lcx["prompt_token_ids"][0], lcx["token_ids"][0]
    cfg = TOKEN_SELECT_EXTRAPOLATE
    spec = {"sink": cfg["sink"], "window": cfg["window"], "k": lambda n: cfg["budget"], "qb": cfg["query_block"],
            "from": len(ids)}
    got = lcx["prompt_logprobs"][0][1:] + lcx["logprobs"][0]
    neutral = gap(got, token_logprobs(model_path, ids + generated, select={**spec, "neutral": True}, compact=True))
    assert within(neutral, whole(stock_yardstick_f32)), (neutral, stock_yardstick_f32)
    c = lcx["lcx_counters"]
    assert c["prefill_blocks_selected"] > 0 and c["selection_lookups"] > 0, c


def _start(lcx: dict, tmp_path, name: str) -> str:
    """Start an engine past the trained length with ``lcx`` and run one short prompt; the log."""
    log = tmp_path / f"{name}.log"
    spec = ArmSpec(model=str(prepare()), backend="lcx", lcx=lcx, prompts=["The capital of France is"], max_tokens=4,
                   engine=LONG)
    try:
        run_arm(spec, log_path=str(log), timeout=600)
    except RuntimeError:
        pass
    return log.read_text()


def test_past_the_trained_length_only_an_extrapolating_method_starts(tmp_path):
    refused = _start({"method": "dense"}, tmp_path, "dense")
    for part in ("--max-model-len 16384 is past SmolLM2-135M-Instruct", "trained length of 8192 positions",
                 "method 'dense' would attend at positions the model never saw"):
        assert part in refused.replace("\\'", "'"), refused[-3000:]
    assert "lcx attention active" not in refused
    started = _start({"method": "streaming", "sink": 16, "window": 1024, "extrapolate": True}, tmp_path, "streaming")
    assert "lcx attention active: method=streaming" in started and "trained length" not in started, started[-3000:]
