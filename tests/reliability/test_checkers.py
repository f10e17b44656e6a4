"""Every comparison helper the engine tests rely on can fail: fed a corrupted output, it says so."""
import math

from lcx_plugin.harness.compare import decode_agreement, problems, prompt_gap

from ..engine.conftest import gap, within

TOKENS = [11, 12, 13, 14]
TOP = [{11: -0.1, 99: -2.5}, {12: -0.3, 98: -1.9}, {13: -0.7, 97: -0.75}, {14: -0.2, 96: -3.0}]


def _copy(top):
    return [dict(s) for s in top]


def test_identical_runs_pass():
    d = decode_agreement(TOKENS, TOP, TOKENS, _copy(TOP))
    assert d == {"steps": 4, "max_gap": 0.0, "flip": None}
    assert not problems(prompt_gap([None, -1.0, -2.0], [None, -1.0, -2.0]), d, tol=1e-6, tie=0.1)


def test_a_shifted_log_probability_fails():
    bad = _copy(TOP)
    bad[1][12] -= 0.5
    assert problems(None, decode_agreement(TOKENS, TOP, TOKENS, bad), tol=0.1, tie=0.1)
    assert problems(prompt_gap([None, -1.0, -2.0], [None, -1.0, -2.6]), None, tol=0.1, tie=0.1)


def test_a_confident_flip_fails_and_a_near_tie_passes():
    # Step 2 is a near-tie in both runs (13 vs 97 within 0.05 nats): flipping there is rounding.
    other = TOKENS[:2] + [97, 55]
    top = _copy(TOP[:2]) + [{97: -0.72, 13: -0.74}, {55: -0.1, 54: -3.0}]
    d = decode_agreement(TOKENS, TOP, other, top)
    assert d["flip"]["step"] == 2 and d["steps"] == 2
    assert not problems(None, d, tol=0.01, tie=0.1)
    # The same flip where run b was sure of its token: what reading another request's KV looks like.
    top[2] = {97: -0.01, 13: -5.0}
    assert problems(None, decode_agreement(TOKENS, TOP, other, top), tol=0.01, tie=0.1)
    # A flip to a token the other run did not even rank second.
    top[2] = {97: -0.72, 50: -0.74}
    d = decode_agreement(TOKENS, TOP, other, top)
    assert math.isinf(d["flip"]["margin_b"]) and problems(None, d, tol=0.01, tie=0.1)


def test_lengths_that_differ_fail():
    assert problems(prompt_gap([None, -1.0], [None, -1.0, -2.0]), None, tol=1.0, tie=1.0)
    assert problems(None, decode_agreement(TOKENS, TOP, TOKENS[:3], TOP[:3]), tol=1.0, tie=1.0)


def test_the_engine_tests_gap_and_within_fail_on_a_corrupted_run():
    ref = [-1.0, -2.0, -0.5, -3.0] * 50
    yard = gap([x + 0.001 for x in ref], ref)
    assert within(gap([x - 0.001 for x in ref], ref), yard)
    corrupted = list(ref)
    for i in range(0, 200, 40):  # 5 positions in 200 off by 2 nats: the p99 catches them (it
        corrupted[i] -= 2.0  # lets 1 in 100 through by design: bf16 flips single positions)
    assert not within(gap(corrupted, ref), yard)
    assert not within(gap([x + 0.05 for x in ref], ref), yard)  # everything a little off: the mean


def test_differences_names_each_phase_that_differs():
    import copy

    from lcx_plugin.harness import matrix

    easy = {"tf_alone": {"token_ids": [[1, 2]]}, "cached": {"cached": [128]}, "partial": {"cached": [256]}}
    pressured = {"batched": {"token_ids": [[1, 2]]}, "tf_batched": {"token_ids": [[1, 2]]}, "preemptions": 3}
    same = copy.deepcopy((easy, pressured))
    assert matrix.differences((easy, pressured), same) == []
    other = copy.deepcopy((easy, pressured))
    other[0]["partial"]["cached"] = [128]
    other[1]["preemptions"] = 4
    assert matrix.differences((easy, pressured), other) == ["at ease: partial", "pressured: preemptions"]


def test_evaluate_tensor_parallel_fails_on_a_corrupted_rank():
    """The split run against one process: equal passes; a prompt position or a generated step
    nats off (a rank reading another KV head's pattern, say) fails; a missing output fails."""
    import copy

    from lcx_plugin.harness import matrix

    one = {"prompt_logprobs": [[None, -1.0, -2.0]], "token_ids": [TOKENS], "top": [_copy(TOP)]}
    easy = {"tf_alone": one}
    tp = {"engine": {"tensor_parallel_size": 3}, "tf_batched": copy.deepcopy(one)}
    assert matrix.evaluate_tensor_parallel("dense", easy, tp, 4e-5)["problems"] == []
    bad = copy.deepcopy(tp)
    bad["tf_batched"]["prompt_logprobs"][0][2] = -2.5
    assert matrix.evaluate_tensor_parallel("dense", easy, bad, 4e-5)["problems"]
    bad = copy.deepcopy(tp)
    bad["tf_batched"]["top"][0][3][14] = -0.9
    assert matrix.evaluate_tensor_parallel("dense", easy, bad, 4e-5)["problems"]
    bad = copy.deepcopy(tp)
    for key in ("prompt_logprobs", "token_ids", "top"):
        bad["tf_batched"][key] = []
    assert matrix.evaluate_tensor_parallel("dense", easy, bad, 4e-5)["problems"]
