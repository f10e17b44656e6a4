"""The reliability matrix over stock and every registered method (``lcx_plugin/harness/matrix.py``):
batched twice against each prompt alone, chunked prefill against whole prefill, a cache so
small that the scheduler preempts and recomputes, and prefix-cache hits (full and partial) as the
engine itself counts them. Dense lcx equals stock exactly under every condition; every row matches
its own run at ease teacher-forced, within tolerances scaled by the stock engine's own noise."""
import pytest

from lcx_plugin import selectors
from lcx_plugin.harness import matrix
from lcx_plugin.harness.model import prepare

pytestmark = pytest.mark.slow


def test_every_method_declares_a_short_context_example():
    missing = [n for n in selectors.names() if selectors.get(n).short_context_example is None]
    assert not missing, f"methods without a short_context_example (the matrix cannot run them): {missing}"


@pytest.fixture(scope="module")
def noise(engines):
    return matrix.noise(*engines("stock"))


@pytest.mark.parametrize("row", matrix.rows())
def test_under_pressure_each_request_gets_what_it_gets_alone_at_ease(engines, noise, row):
    easy, pressured = engines(row)
    result = matrix.evaluate(row, easy, pressured, noise, matrix.prompt_ids(str(prepare())))
    assert not result["problems"], "\n".join(result["problems"])
    assert result["continuations_compared"] == len(matrix.LENGTHS) * (matrix.COPIES + 2)


@pytest.mark.parametrize("row", matrix.tensor_parallel_rows())
def test_split_over_ranks_each_method_matches_one_process(engines, tensor_parallel_engine, noise, row):
    """tensor_parallel_size=3 (one KV head per rank; the model's 9 query heads do not split in 2):
    per-rank KV-head offsets into head patterns, per-rank selections and caches, and the all-reduce
    give what one process gives, teacher-forced. (Methods with nothing per KV head are left out:
    ``matrix.NOTHING_PER_KV_HEAD``.) The noise term is stock's batching noise in one process,
    measured in this session: the suite does not split stock too (see ``matrix.tensor_parallel_noise``)."""
    tp = tensor_parallel_engine(row)
    assert tp["engine"]["tensor_parallel_size"] == matrix.TP_RANKS
    result = matrix.evaluate_tensor_parallel(row, engines(row)[0], tp, noise)
    assert not result["problems"], "\n".join(result["problems"])
    assert result["requests"] == len(matrix.LENGTHS)


def test_dense_lcx_equals_stock_under_every_condition(engines):
    assert matrix.differences(engines("stock"), engines("dense")) == []


def test_token_selects_selection_cache_is_used_and_counted_at_ease_and_under_pressure(engines):
    """Requests joining, leaving and being preempted: lookups (per request and KV head) are
    counted, some reuse a selection, and a request's first lookup never does."""
    for run in engines("token_select"):
        counters = run["lcx_counters"]
        assert 0 < counters.get("selection_hits", 0) < counters["selection_lookups"], counters


def test_only_methods_with_nothing_per_kv_head_are_left_out_of_the_tensor_parallel_rows():
    left_out = set(selectors.names()) - set(matrix.tensor_parallel_rows())
    assert left_out == set(matrix.NOTHING_PER_KV_HEAD) <= set(selectors.names())
    assert {"head_split", "token_select", "hip"} <= set(matrix.tensor_parallel_rows())
