"""The reliability matrix: stock and every registered method, each on two engines (at ease and
under pressure, see ``reliability.py``), judged by one function, ``evaluate``, that the tests and
the report (``bench/reliability.py``) share.

Dense lcx must equal stock exactly. Every row must match its own run at ease teacher-forced: prompt
log-probabilities and every generated step's log-probability within ``tol`` nats, flips only at
near-ties (``compare.decode_agreement``). The tolerances grow with the stock engine's own batching
noise on the machine, measured in the same run (every engine here runs in float32: ``MATRIX_DTYPE``).

A method whose prefill selection follows the scheduler's chunks (``Selector.selection_follows_chunks``:
HiP's query blocks tile each chunk's rows) cannot match whole prefill under chunked prefill; its
pressured engine prefills whole prompts (``WHOLE_PREFILL``) and keeps every other pressure.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from lcx_plugin import selectors
from lcx_plugin.config import LcxConfig
from lcx_plugin.selectors import TopKSelector

from .compare import decode_agreement, problems, prompt_gap
from .reliability import PAGE, MatrixJob, run_matrix_engine, shared_tokens
from .settings import RunSettings, choose

#: Four mixed lengths, from under one page to seven pages (124, 380, 636 and 892 tokens): the
#: shortest stays dense under every example config, the others select (HiP's from 636). Each ends
#: 4 tokens before a page boundary, so every request needs a new page while it decodes, and the
#: small cache must preempt. (Up to nine pages before, 2,528 prompt tokens against 2,032. That
#: did not make the rows faster: an engine's time is mostly its start, its prefills with prompt
#: log-probabilities and its float32 decode steps.)
LENGTHS = tuple(pages * PAGE + PAGE - 4 for pages in (0, 2, 4, 6))
#: New tokens per request in the test suite's matrix: the prompt's page fills after 4 and the
#: last 2 need a new one, so every request still takes a page while it decodes. (10 before, with
#: prompts ending 8 tokens before a boundary. The stock row on a 2-core AVX2 EPYC: 69.7 s with the
#: at-ease cached and partial runs one request at a time and 10 tokens, 64.1 s with those runs
#: batched, 60.1 s batched with 6 tokens, the same preemptions. ``./lcx bench reliability`` still
#: asks for 16.)
MAX_TOKENS = 6
#: Each prompt batched twice under pressure: copies find each other's blocks in the cache, and
#: the four prompts (16 pages once decoding) cannot all be resident in 9. ``./lcx bench
#: reliability`` batches each 6 times.
COPIES = 2
#: A flip of the greedy token is accepted where both runs rank the two tokens within this many nats
#: (plus the noise term): selections that see a recomputed or batched context slightly differently
#: flip near-ties (token_select flipped one at 0.12 nats, float32, in an earlier, longer version of
#: this matrix); reading another request's KV, or losing part of one's own, makes confident
#: differences of nats.
TIE = 0.25
#: A preempted request is recomputed from the start, its generated tokens prefilled as prompt. A
#: method whose prefill attends differently from its decode (TopKSelector: TokenSelect prefills
#: dense, HiP searches per query block) then holds other keys and values for those tokens, and its
#: later steps move: measured 0.06 nats (token_select) and 0.51 nats (hip), float32. From the step
#: a request was preempted at, such methods are held to this many nats, and flips to this margin.
RECOMPUTE_TOL = 1.0


#: Engine settings a row needs beyond ``reliability.PRESSURED``: a head split keeps its streaming
#: heads in a cache group of their own, whose blocks come from the same pool, so 12 blocks hold
#: only 512 tokens of one request there; 24 hold the longest prompt and still force preemption
#: (measured with each prompt batched twice: 1 preemption in the batch at the suite's lengths; at
#: the earlier, longer ones 8, where 32 blocks forced none and 28 one). The other rows' 10 blocks
#: force 2 in the batch and 1 more in the batched run with prompt log-probabilities.
PRESSURED_FOR = {"head_split": {"num_gpu_blocks_override": 24}}


#: A method whose prefill selection follows the scheduler's chunks runs its pressured engine with
#: whole prefill (everything else as PRESSURED): chunked prefill gives it other selections, not
#: whole prefill's, so the comparison would not be about batching, preemption or the cache. (HiP
#: under 384-token chunks: prompt log-probabilities 0.2 nats from whole prefill on average, first
#: tokens flipped with margins of 1.4 nats; its chunked lists are checked against the float64
#: search in tests/selectors/test_hip.py.)
WHOLE_PREFILL = {"max_num_batched_tokens": 8192}


def pressured_engine(row: str) -> dict:
    cls = None if row == "stock" else selectors.get(row)
    return {**PRESSURED_FOR.get(row, {}), **(WHOLE_PREFILL if cls is not None and cls.selection_follows_chunks else {})}


def rows() -> list[str]:
    return ["stock", *selectors.names()]


def row_config(row: str) -> tuple[str | None, dict | None]:
    """``(backend, lcx config)`` of a row: stock, or the method with its ``short_context_example``."""
    if row == "stock":
        return None, None
    example = selectors.get(row).short_context_example
    if example is None:
        raise ValueError(f"method {row!r} declares no short_context_example: the matrix cannot run it")
    return "lcx", {"method": row, **example}


@functools.cache
def prompt_ids(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from .prompts import long_prompt

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = tok(long_prompt(n + 100, seed=40 + i, key=str(2200 + 37 * i)))["input_ids"]
        cut = len(ids) - n  # filler dropped after the first 16 tokens: the length exactly n
        assert cut >= 0, (len(ids), n)
        out.append(ids[:16] + ids[16 + cut:])
    return out


#: Every engine of the matrix runs in float32, on every machine. In bfloat16 (the settings' choice
#: where the CPU has native bf16) batching and recomputation move the logits by about as much as
#: the near-ties between pages or tokens that HiP's and TokenSelect's selections decide (HiP's
#: pressured row failed on an AVX-512 EPYC in bf16; it passes in float32 there). The matrix is about
#: batching, preemption and the cache, so its verdict must not depend on which dtype the CPU chose.
MATRIX_DTYPE = "float32"


def matrix_settings() -> RunSettings:
    """This machine's settings (thread binding), in ``MATRIX_DTYPE``."""
    return choose(dtype=MATRIX_DTYPE)


def run_row(row: str, model: str, log_dir: str | Path, copies: int = COPIES,
            max_tokens: int = MAX_TOKENS) -> tuple[dict, dict]:
    """The row's two engines: ``(at ease, pressured)``, each request generating ``max_tokens``."""
    backend, lcx = row_config(row)
    out = []
    for pressured in (False, True):
        job = MatrixJob(model=model, prompts=prompt_ids(model), backend=backend, lcx=lcx, pressured=pressured,
                        copies=copies, max_tokens=max_tokens, engine=pressured_engine(row) if pressured else {})
        log = Path(log_dir) / f"{row}-{'pressured' if pressured else 'easy'}.log"
        out.append(run_matrix_engine(job, log_path=str(log), settings=matrix_settings()))
        log.with_suffix(".json").write_text(json.dumps(out[-1]))  # beside its log, for a failing test's reader
    return out[0], out[1]


def noise(stock_easy: dict, stock_pressured: dict) -> float:
    """The stock engine's largest prompt log-probability difference, batched under pressure against
    alone at ease (float32: about 5e-5 nats)."""
    pairs = zip(stock_pressured["tf_batched"]["prompt_logprobs"], stock_easy["tf_alone"]["prompt_logprobs"])
    return max(prompt_gap(a, b)["max"] for a, b in pairs)


#: Ranks of the tensor-parallel engine: the embedded model's 9 query and 3 KV heads split over 3
#: (one KV head and its 3 query heads per rank), not over 2.
TP_RANKS = 3
#: Methods with nothing per KV head, left out of the test suite's tensor-parallel rows (``./lcx
#: bench reliability`` still splits every row, and checks dense against stock split): ``dense``
#: selects nothing and runs the engine's own op on each rank, which the stock row splits too;
#: ``streaming``'s selection is positions only, and the window kernels it runs are the ones the
#: head split's streaming heads run in their row. There is no rank offset for either to get wrong.
#: Each tensor-parallel engine costs about 50 s on 2 cores (three ranks).
NOTHING_PER_KV_HEAD = ("dense", "streaming")


def tensor_parallel_rows() -> list[str]:
    """The methods the test suite splits over ranks: every one with per-KV-head state or data."""
    return [n for n in selectors.names() if n not in NOTHING_PER_KV_HEAD]


def run_tensor_parallel(row: str, model: str, log_dir: str | Path, ranks: int = TP_RANKS,
                        max_tokens: int = MAX_TOKENS) -> dict:
    """The row's at-ease engine split over ``ranks`` worker processes (``reliability.TENSOR_PARALLEL``)."""
    backend, lcx = row_config(row)
    job = MatrixJob(model=model, prompts=prompt_ids(model), backend=backend, lcx=lcx, tensor_parallel=ranks,
                    max_tokens=max_tokens)
    log = Path(log_dir) / f"{row}-tp{ranks}.log"
    out = run_matrix_engine(job, log_path=str(log), settings=matrix_settings())
    log.with_suffix(".json").write_text(json.dumps(out))
    return out


def tensor_parallel_noise(stock_easy: dict, stock_tp: dict) -> float:
    """The stock engine's largest prompt log-probability difference split over ranks against one
    process: the ranks' partial sums are reduced in another order (float32: 4.3e-5 nats in the
    last ``./lcx bench reliability``, which splits stock; 3.8e-5 in the one before). The test
    suite does not split stock: its split rows take stock's batching noise in one process
    (``noise``, about 5e-5 nats) as their noise term, the same order, and a small part of the
    tolerance either way (0.01 + 4 x noise).
    That saves one three-rank engine, about 47 s on 2 cores."""
    pairs = zip(stock_tp["tf_batched"]["prompt_logprobs"], stock_easy["tf_alone"]["prompt_logprobs"])
    return max(prompt_gap(a, b)["max"] for a, b in pairs)


def evaluate_tensor_parallel(row: str, easy: dict, tp: dict, noise_nats: float) -> dict:
    """A row split over ranks against the same row in one process, teacher-forced: prompt
    log-probabilities and every generated step within ``tol``, flips only at near-ties."""
    tol, tie = 0.01 + 4 * noise_nats, TIE + 4 * noise_nats
    base, run = easy["tf_alone"], tp["tf_batched"]
    found: list[str] = []
    gaps, decode_gap, flips = [], 0.0, 0
    for i, (a, b) in enumerate(zip(run["prompt_logprobs"], base["prompt_logprobs"])):
        gaps.append(prompt_gap(a, b))
        d = decode_agreement(run["token_ids"][i], run["top"][i], base["token_ids"][i], base["top"][i])
        decode_gap, flips = max(decode_gap, d["max_gap"]), flips + (d["flip"] is not None)
        found += [f"prompt {i} under tensor_parallel_size={tp['engine']['tensor_parallel_size']}: {p}"
                  for p in problems(gaps[-1], d, tol, tie)]
    if len(run["token_ids"]) != len(base["token_ids"]):
        found.append(f"{len(run['token_ids'])} outputs for {len(base['token_ids'])} prompts")
    return {"row": row, "ranks": tp["engine"]["tensor_parallel_size"], "requests": len(run["token_ids"]),
            "prompt_gap_max": max((g["max"] for g in gaps), default=0.0), "decode_gap_max": decode_gap, "flips": flips,
            "tolerance": {"tol": tol, "tie": tie, "noise": noise_nats}, "problems": found}


#: What one engine run records that must be identical for two dense-equivalent rows.
IDENTICAL = ("tf_alone", "cached", "partial", "batched", "tf_batched", "preemptions")


def differences(a: tuple[dict, dict], b: tuple[dict, dict]) -> list[str]:
    """Where two rows' runs ``(at ease, pressured)`` differ (empty: identical in every phase)."""
    return [f"{'pressured' if i else 'at ease'}: {key}" for i, (x, y) in enumerate(zip(a, b))
            for key in IDENTICAL if key in x and x[key] != y.get(key)]


def evaluate(row: str, easy: dict, pressured: dict, noise_nats: float, prompts: list[list[int]]) -> dict:
    """Figures and problems of one row (``problems`` empty: the row passes)."""
    cls = None if row == "stock" else selectors.get(row)
    topk = cls is not None and issubclass(cls, TopKSelector)
    tol, tie = 0.01 + 4 * noise_nats, TIE + 4 * noise_nats
    after = (RECOMPUTE_TOL, RECOMPUTE_TOL) if topk else (tol, tie)  # from a preemption on
    found: list[str] = []
    base = easy["tf_alone"]
    gaps = [prompt_gap(a, b) for a, b in zip(pressured["tf_batched"]["prompt_logprobs"], base["prompt_logprobs"])]
    for i, g in enumerate(gaps):
        found += [f"prompt {i} batched: {p}" for p in problems(g, None, tol, tie)]
    runs = {"batched, chunked, preempted": (pressured["batched"], lambda j: j % len(prompts), pressured),
            "batched with prompt log-probabilities": (pressured["tf_batched"], lambda j: j, pressured),
            "batched over a warm prefix cache": (easy["cached"], lambda j: j, easy)}
    decode_gap, flips, compared, resumed = 0.0, 0, 0, 0
    for what, (run, prompt_of, engine) in runs.items():
        for j, (rid, tokens, top) in enumerate(zip(run["request_ids"], run["token_ids"], run["top"])):
            i = prompt_of(j)
            want, want_top = base["token_ids"][i], base["top"][i]
            cut = min([n for r, n in engine["preempted"] if r == rid] + [len(tokens)])
            resumed += cut < len(tokens)
            d = decode_agreement(tokens[:cut], top[:cut], want[:cut], want_top[:cut])
            whole = decode_agreement(tokens, top, want, want_top)
            decode_gap, flips, compared = max(decode_gap, whole["max_gap"]), flips + (whole["flip"] is not None), compared + 1
            found += [f"request {j} (prompt {i}), {what}: {p}" for p in problems(None, d, tol, tie)]
            if cut < len(tokens):
                found += [f"request {j} (prompt {i}), {what}, from its preemption at step {cut}: {p}"
                          for p in problems(None, whole, *after)]
    hits = row == "stock" or LcxConfig.from_dict(row_config(row)[1]).selector.prefix_cache_hits()
    expected_full = [(len(p) - 1) // PAGE * PAGE if hits else 0 for p in prompts]
    expected_partial = [shared_tokens(p, easy["shared_pages"]) if hits else 0 for p in prompts]
    if easy["cached"]["cached"] != expected_full:
        found.append(f"full prefix-cache hits {easy['cached']['cached']}, expected {expected_full}")
    if easy["partial"]["cached"] != expected_partial:
        found.append(f"partial prefix-cache hits {easy['partial']['cached']}, expected {expected_partial}")
    if pressured["preempted_in_batch"] == 0:
        found.append("the small cache forced no preemption")
    return {"row": row, "config": row_config(row)[1], "requests": compared + len(prompts) * 2,
            "preemptions": pressured["preemptions"], "prefix_cached_tokens": sum(pressured["batched"]["cached"])
            + sum(easy["cached"]["cached"]) + sum(easy["partial"]["cached"]),
            "prompt_gap_max": max(g["max"] for g in gaps), "prompt_gap_mean_max": max(g["mean"] for g in gaps),
            "decode_gap_max": decode_gap, "flips": flips, "continuations_compared": compared,
            "continuations_resumed": resumed,
            "tolerance": {"tol": tol, "tie": tie, "after_preemption": after[0], "noise": noise_nats, "top_k": topk,
                          "whole_prefill_under_pressure": cls is not None and cls.selection_follows_chunks},
            "problems": found}
