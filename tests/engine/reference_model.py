"""An independent oracle for engine tests: the embedded model in Hugging Face transformers, float32,
with its attention restricted exactly as an lcx selection defines it (sinks + recent window per
query, or dense).

It shares no code with lcx's kernels or the engine: the model code is transformers', the masked
attention a few lines of plain torch here. Engine outputs are compared with it teacher-forced:
the log-probability of each token given the tokens before it.
"""
from __future__ import annotations

import functools

import torch

# window None: dense; streaming: [layers, Hkv] bool; select: a TokenSelect statement (see token_logprobs);
# kv_quant: (bits, group_size) of quantized pages, every key and value read back as stored, or
#   ("mixed", group_size, block_size, fraction, prompt_len) of mixed-precision pages;
# kv_noise: relative noise put on keys and values before they are quantized (seeded per layer)
# compact: every visible key read at its compacted position (see _compacted_scores)
_MASK = {"sink": 0, "window": None, "streaming": None, "select": None, "kv_quant": None, "kv_noise": 0.0,
         "hip": None, "compact": False}


def _unrotated(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., T, D] rotated by transformers at positions 0..T-1 (neox pairs: dimension f with
    f + D/2), turned back to position 0 with the model's own inverse frequencies."""
    t, half = x.shape[-2], x.shape[-1] // 2
    angle = torch.arange(t, dtype=torch.float64)[:, None] * _ROTARY["inv_freq"][None, :]  # [T, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos + b * sin, b * cos - a * sin], -1)


def _top_by_vote(logits: torch.Tensor, eligible: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """``logits`` [H, N] -> [Hkv, N] bool: the ``k`` eligible positions with the most votes (a
    softmax per query head, summed over the group), ties to the earlier position."""
    probs = torch.softmax(logits, -1)
    votes = probs.view(-1, group, logits.shape[-1]).sum(1).double()
    keep = torch.zeros_like(votes, dtype=torch.bool)
    ranked = torch.sort(-votes.masked_fill(~eligible[None, :], float("-inf")), dim=-1, stable=True).indices
    keep.scatter_(1, ranked[:, :k], True)
    return keep & eligible[None, :]


def _token_select_prompt(scores: torch.Tensor, out: torch.Tensor, group: int) -> None:
    """Rows before ``select["from"]`` (one prompt chunk) with ``select["qb"]``: each block of ``qb``
    rows scores with the mean of its rows' scores (the mean query's, the product being linear)
    the positions up to its first row, keeps the top ``k(first + 1)`` of those past the sinks
    and wholly before the first row's window, and lists the positions between its first and
    last row's windows; each row sees those, the sinks and its own window."""
    sel = _MASK["select"]
    sink, window, qb, start = sel["sink"], sel["window"], sel["qb"], sel["from"]
    if start <= sink + window + sel["k"](start):
        return  # the budget covers the prompt: dense
    j = torch.arange(scores.shape[-1])
    for r0 in range(0, start, qb):
        r1 = min(r0 + qb, start)
        first, last = r0, r1 - 1
        logits = scores[0, :, r0:r1, : first + 1].mean(1)  # [H, first + 1]
        eligible = (j[: first + 1] >= sink) & (j[: first + 1] <= first - window)
        chosen = torch.zeros(logits.shape[0] // group, scores.shape[-1], dtype=torch.bool)
        chosen[:, : first + 1] = _top_by_vote(logits, eligible, sel["k"](first + 1), group)
        chosen |= ((j >= max(first - window + 1, sink)) & (j <= last - window))[None, :]
        for i in range(r0, r1):
            own = (j < sink) | ((j > i - window) & (j <= i))
            out[0, :, i] = (chosen | own[None, :]).repeat_interleave(group, 0) & out[0, :, i]  # causal too


def _token_select(scores: torch.Tensor, visible: torch.Tensor, group: int, row0: int = 0) -> torch.Tensor:
    """Rows at or after ``select["from"]``: sinks + window + the top ``k(row + 1)`` positions per KV
    head by the soft vote (per-head softmax over the row's causal scores, summed over the group),
    ties to the earlier position. Rows before it (the prompt) as ``_token_select_prompt`` states
    when ``select`` has ``qb``, else dense. ``scores`` [1, H, T - row0, T] (rows ``row0`` on; ``row0``
    > 0 only without ``qb``) -> visible [1, H, T, T] bool."""
    sel = _MASK["select"]
    sink, window = sel["sink"], sel["window"]
    t = scores.shape[-1]
    out = visible.clone()
    if sel.get("qb"):
        _token_select_prompt(scores, out, group)
    for i in range(sel["from"], t):
        eligible = torch.arange(t)
        eligible = (eligible >= sink) & (eligible <= i - window)
        k = sel["k"](i + 1)
        if int(eligible.sum()) <= k:
            continue  # the budget covers the context: dense
        probs = torch.softmax(scores[0, :, i - row0].masked_fill(~visible[0, 0, i], float("-inf")), -1)  # [H, T]
        votes = probs.view(-1, group, t).sum(1).double()  # [Hkv, T]
        keep = torch.zeros_like(votes, dtype=torch.bool)
        ranked = torch.sort(-votes.masked_fill(~eligible[None, :], float("-inf")), dim=-1, stable=True).indices
        keep.scatter_(1, ranked[:, :k], True)
        j = torch.arange(t)
        keep |= ((j < sink) | ((j > i - window) & (j <= i)))[None, :]
        out[0, :, i] = keep.repeat_interleave(group, 0)
    return out


def _hip_pages(bound: list[float], lo: int, hi: int, k: int) -> set[int]:
    """HiP's tree search over page scores ``bound`` (pages ``lo .. hi-1``): 2k chunks, each scored
    by its middle page; keep the k best (ties: the earlier chunk), halve them, until single pages."""
    n, m = max(0, hi - lo), 2 * k
    chunks = [(lo + j * n // m, lo + (j + 1) * n // m) for j in range(m)]
    while True:
        ranked = sorted((j for j, (a, b) in enumerate(chunks) if b > a),
                        key=lambda j: (-bound[chunks[j][0] + (chunks[j][1] - chunks[j][0] - 1) // 2], j))
        kept = [chunks[j] for j in ranked[:k]]
        if all(b - a <= 1 for a, b in kept):
            return {a for a, _ in kept}
        chunks = [h for a, b in kept for h in ((a, a + (b - a + 1) // 2), (a + (b - a + 1) // 2, b))]


def _hip(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, group: int, layer: int) -> torch.Tensor:
    # query [1, H, T, D], key [1, H, T, D] (repeated per query head)
    """HiP as ``_MASK["hip"]`` states it (``sink``, ``window``, ``k`` pages, ``bs`` tokens per
    page, ``qb`` rows per prefill query block, ``from`` the first decode row, ``dense_layers``;
    a decode search every step): rows before ``from`` in query blocks of ``qb``, each choosing
    among the pages wholly before its first row's window; each later row alone, choosing among
    the pages before its window's first page, and seeing whole sink and window pages. Pages are
    scored by ``max over rows and group heads of sum_d max(q_d min_d, q_d max_d)`` of the page's
    key minima and maxima (of un-rotated queries and keys with ``neutral``). ``visible`` [T, T] ->
    [H, T, T]."""
    cfg = _MASK["hip"]
    key = key[:, ::group]  # the KV heads (``key`` arrives repeated for each query head)
    if cfg.get("neutral"):  # position-neutral search: bounds of un-rotated keys, un-rotated queries
        query, key = _unrotated(query), _unrotated(key)
    t, hkv = query.shape[2], key.shape[1]
    out = visible[None].expand(query.shape[1], t, t).clone()
    bs, sink, window, k, qb = cfg["bs"], cfg["sink"], cfg["window"], cfg["k"], cfg["qb"]
    dense_up_to = sink + window + k * bs  # a context this short is kept whole: dense
    if layer in cfg["dense_layers"]:
        return out
    pages = -(-t // bs)
    lo = -(-sink // bs)
    keys = torch.nn.functional.pad(key[0], (0, 0, 0, pages * bs - t), value=float("nan")).view(hkv, pages, bs, -1)
    kmin, kmax = keys.nan_to_num(float("inf")).amin(2), keys.nan_to_num(float("-inf")).amax(2)  # [Hkv, P, D]
    page_of = torch.arange(t) // bs
    j = torch.arange(t)

    def chosen(rows: torch.Tensor, g: int, hi: int) -> torch.Tensor:
        """rows [R, D] -> [P] bool: the pages the search keeps."""
        b = torch.maximum(rows[:, None, :] * kmin[g][None], rows[:, None, :] * kmax[g][None]).sum(-1).amax(0)
        mask = torch.zeros(pages, dtype=torch.bool)
        mask[sorted(_hip_pages(b.tolist(), lo, hi, k))] = True
        return mask

    start = cfg["from"]
    if start > dense_up_to:
        for r0 in range(0, start, qb):
            r1 = min(r0 + qb, start)
            hi = max(lo, -(-max(0, r0 - window + 1) // bs))
            i = torch.arange(r0, r1)[:, None]
            for g in range(hkv):
                heads = slice(g * group, (g + 1) * group)
                listed = chosen(query[0, heads, r0:r1].reshape(-1, query.shape[-1]), g, hi)[page_of]
                out[heads, r0:r1] &= ((j[None] < sink) | (j[None] > i - window) | listed[None])[None]
    for i in range(start, t):
        s = i + 1
        if s <= dense_up_to:
            continue
        hi = max(lo, min(-(-s // bs), max(0, s - window) // bs))
        for g in range(hkv):
            heads = slice(g * group, (g + 1) * group)
            mask = chosen(query[0, heads, i], g, hi)
            mask[:lo] = True
            mask[hi:] = True
            out[heads, i] &= mask[page_of][None]
    return out


def _mixed_round_trip(query, key, value, scale: float, group: int, block_size: int, fraction: float, prompt_len: int):
    """Keys and values ``[1, Hkv, T, D]`` as mixed-precision pages of ``block_size`` tokens hold them,
    filled as the engine fills them: the prompt as one chunk, then one token per decode step, each
    write followed by its promotion (lcx's own format defines the storage and the choice)."""
    from lcx_plugin.kernels.paged import BatchPlan, mixed

    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H(kv), D]
    t, hkv, d = k.shape
    pages = -(-t // block_size)
    cell = mixed.cell_bytes(d, group, block_size, fraction)
    kv = mixed.mixed(torch.full((pages, hkv, block_size, cell), 255, dtype=torch.uint8), d, group, fraction)
    table = torch.arange(pages, dtype=torch.int32)[None]
    bounds = [0, min(prompt_len, t)] + list(range(min(prompt_len, t) + 1, t + 1))
    for s, e in zip(bounds, bounds[1:]):
        slots = torch.arange(s, e)
        kv.write(k[s:e], v[s:e], slots)
        plan = BatchPlan.from_lists([e - s], [e], table)
        kv.promote(k[s:e], v[s:e], slots, mixed.observed_importance(q[s:e], k[s:e], plan, scale))
    every = torch.arange(pages)
    kk, vv = kv.gather(every[:, None].expand(pages, hkv), torch.arange(hkv)[None].expand(pages, hkv))
    back = [x.permute(1, 0, 2, 3).reshape(hkv, pages * block_size, d)[None, :, :t] for x in (kk, vv)]
    return back[0], back[1]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None), causal + sink/window."""
    group = query.shape[1] // key.shape[1]
    if _MASK["kv_quant"] is not None:  # the storage format under test: lcx's own quantizer defines it
        from lcx_plugin.kernels.paged import quant

        bits, size = _MASK["kv_quant"][:2]
        if _MASK["kv_noise"]:
            g = torch.Generator().manual_seed(module.layer_idx)
            key, value = (x * (1 + _MASK["kv_noise"] * torch.randn(x.shape, generator=g)) for x in (key, value))
        if bits == "mixed":  # which tokens hold int8 slots follows the queries too: they carry the noise as well
            scorer = query
            if _MASK["kv_noise"]:
                scorer = query * (1 + _MASK["kv_noise"] * torch.randn(query.shape, generator=g))
            key, value = _mixed_round_trip(scorer, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5,
                                           size, *_MASK["kv_quant"][2:])
        else:
            key, value = quant.round_trip(key, value, bits, size, quant.rotates_keys(key.shape[-1], bits))
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    t = query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The scores themselves are needed only to choose (TokenSelect) or re-position (compacted)
    # keys; otherwise the masked attention is torch's own SDPA, four times faster on long prompts.
    # Quantized pages keep the explicit softmax: a quantizer turns the last bit of any arithmetic
    # change into whole code steps downstream, and the quantized tests' yardstick was set on it.
    # Selection at decode rows only (no prompt blocks, rotated scores) needs the scores of those
    # rows alone; the attention itself is then SDPA's too.
    sel = _MASK["select"]
    tail_only = sel is not None and not sel.get("qb") and not sel.get("neutral")
    explicit = (sel is not None and not tail_only) or _MASK["compact"] or _MASK["kv_quant"] is not None
    scores = (query @ key.transpose(-1, -2)) * scale if explicit else None
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    visible = j <= i
    if _MASK["window"] is not None:
        windowed = visible & ((j < _MASK["sink"]) | (j > i - _MASK["window"]))
        if _MASK["streaming"] is None:
            visible = windowed
        else:  # a head split: streaming KV heads windowed, retrieval heads dense
            heads = _MASK["streaming"][module.layer_idx].repeat_interleave(group)[:, None, None]
            visible = torch.where(heads, windowed, visible)
    if tail_only:
        row0 = min(sel["from"], t)
        chooser = (query[:, :, row0:] @ key.transpose(-1, -2)) * scale
        visible = _token_select(chooser, visible[None, None].expand(1, query.shape[1], t, t), group, row0)
    elif _MASK["select"] is not None:
        chooser = scores
        if _MASK["select"].get("neutral"):  # position-neutral: un-rotated queries against un-rotated keys
            chooser = (_unrotated(query) @ _unrotated(key).transpose(-1, -2)) * scale
        visible = _token_select(chooser, visible[None, None].expand(1, scores.shape[1], t, t), group)
    if _MASK["hip"] is not None:
        visible = _hip(query, key, visible, group, module.layer_idx)[None]
    if scores is None:
        return _sdpa(query, key, value, visible, scale, module.layer_idx, group), None
    if _MASK["compact"]:
        scores = _compacted_scores(scores, query, key, visible.expand(1, query.shape[1], t, t), scale)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ value
    return out.transpose(1, 2).contiguous(), None


def _sdpa(query, key, value, visible, scale: float, layer: int, group: int) -> torch.Tensor:
    """Masked attention by torch's SDPA, ``[B, T, H, D]``. ``visible`` is ``[T, T]`` (every head) or
    ``[1, H, T, T]``; a head split's ``[H, T, T]`` runs as its two head groups, the retrieval heads
    causal, the streaming heads under the window's ``[T, T]`` mask (a 3-D mask sends SDPA down its
    unfused path: twice the time on a 3k-token prompt). The causal mask itself (no window, no
    selection: a 2-D ``visible`` without ``window``) runs as ``is_causal``."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(heads, mask):  # mask None: causal
        q, k, v = (x if heads is None else x[:, heads] for x in (query, key, value))
        return sdpa(q, k, v, is_causal=True, scale=scale) if mask is None else sdpa(q, k, v, attn_mask=mask, scale=scale)

    if visible.dim() == 3:  # a head split: [H, T, T] from the per-layer streaming mask
        streaming = _MASK["streaming"][layer].repeat_interleave(group)
        out = torch.empty_like(query)
        for heads, windowed in ((streaming, True), (~streaming, False)):
            idx = torch.nonzero(heads).flatten()
            if idx.numel():
                out[:, idx] = attend(idx, visible[idx[0]] if windowed else None)
    else:
        out = attend(None, None if visible.dim() == 2 and _MASK["window"] is None else visible)
    return out.transpose(1, 2).contiguous()


def _compacted_scores(scores, query, key, visible, scaling):
    """``scores`` with each row's visible keys at compacted positions: row i's visible keys, in
    order, sit at 0, 1, ... and the row itself at its own rank, so key j is ``d_ij`` = (visible keys
    in (j, i]) before it instead of ``i - j``. transformers has already rotated q and k at their
    absolute positions (neox pairs: dimension f with f + D/2), so the pair is turned by the
    difference ``g = (i - j) - d_ij``: ``q . R(g) k = sum_f cos(g w_f) (qa ka + qb kb) +
    sin(g w_f) (qb ka - qa kb)``, with the model's own inverse frequencies ``w``. Only key columns
    where some pair moves are recomputed (for sinks + window: the sinks)."""
    inv_freq = _ROTARY["inv_freq"]
    t, half = query.shape[2], query.shape[-1] // 2
    vis = visible[0]  # [H, T, T]
    if bool((vis == vis[:1]).all()):
        vis = vis[:1]  # the same on every head: computed once
    upto = vis.to(torch.int32).cumsum(-1, dtype=torch.int32)
    d = torch.diagonal(upto, dim1=-2, dim2=-1)[..., None] - upto  # visible keys in (j, i]
    shift = (torch.arange(t, dtype=torch.int32)[:, None] - torch.arange(t, dtype=torch.int32)[None, :]) - d
    shift = shift.masked_fill_(~vis, 0)
    cols = torch.nonzero((shift != 0).any(0).any(0)).flatten()
    if cols.numel() == 0:
        return scores
    g = shift[:, :, cols].float()  # [H or 1, T, C]
    q, k = query[0].float(), key[0][:, cols].float()
    qa, qb, ka, kb = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    out = torch.zeros(q.shape[0], t, cols.numel(), dtype=torch.float32)
    for f in range(half):
        dot = qa[..., f, None] * ka[..., None, :, f] + qb[..., f, None] * kb[..., None, :, f]
        cross = qb[..., f, None] * ka[..., None, :, f] - qa[..., f, None] * kb[..., None, :, f]
        angle = g * float(inv_freq[f])
        out += torch.cos(angle) * dot + torch.sin(angle) * cross
    scores = scores.clone()
    scores[0][:, :, cols] = (out * scaling).to(scores.dtype)
    return scores


_ROTARY: dict = {}


@functools.cache
def _model(path: str):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("lcx_reference", _attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="lcx_reference")
    _ROTARY["inv_freq"] = model.model.rotary_emb.inv_freq.double().clone()
    return model.eval()


_CACHE: dict[tuple, list[float]] = {}  # the same restriction of the same tokens is computed once a session


@torch.no_grad()
def token_logprobs(path: str, token_ids: list[int], sink: int = 0, window: int | None = None,
                   streaming: torch.Tensor | None = None, select: dict | None = None,
                   kv_quant: tuple | None = None, kv_noise: float = 0.0, hip: dict | None = None,
                   compact: bool = False) -> list[float]:
    """``out[i]`` = log p(token_ids[i+1] | token_ids[:i+1]) under the restricted attention (on the
    heads marked in ``streaming`` ``[layers, kv_heads]`` only, when given). ``select``: TokenSelect
    at decode, ``{"from": first selected row, "sink", "window", "k": seq_len -> tokens kept}``
    (rows before ``from``, the prompt, stay dense unless ``"qb"`` gives prompt blocks;
    ``"neutral": True`` scores un-rotated queries and keys). ``kv_quant``: every key and value as quantized
    pages of ``(bits, group_size)`` store it, after relative noise ``kv_noise`` on their inputs (the
    arithmetic noise of an engine, to measure how much a format amplifies it). ``hip``: HiP's
    selection (see ``_hip``). ``compact``: the visible keys at compacted positions."""
    key = None
    if select is None and hip is None:  # a TokenSelect statement holds a function: never cached
        mask = None if streaming is None else tuple(streaming.flatten().tolist())
        key = (path, tuple(token_ids), sink, window, mask, kv_quant, kv_noise, compact)
        if key in _CACHE:
            return list(_CACHE[key])
    logp = _next_token_logp(path, token_ids, sink=sink, window=window, streaming=streaming, select=select,
                            kv_quant=kv_quant, kv_noise=kv_noise, hip=hip, compact=compact)
    out = logp.gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0].tolist()
    if key is not None:
        _CACHE[key] = list(out)
    return out


def _next_token_logp(path: str, token_ids: list[int], **mask) -> torch.Tensor:
    """``[len - 1, vocab]`` float32: the log-distribution of each next token."""
    _MASK.update({"sink": 0, "window": None, "streaming": None, "select": None, "kv_quant": None, "kv_noise": 0.0,
                  "hip": None, "compact": False, **mask})
    try:
        logits = _model(path)(torch.tensor([token_ids])).logits[0, :-1].float()
    finally:
        _MASK.update(kv_quant=None, select=None, kv_noise=0.0, hip=None, compact=False)
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def next_token_kl(path: str, token_ids: list[int], kv_quant: tuple | None = None, sink: int = 0,
                  window: int | None = None, streaming: torch.Tensor | None = None) -> list[float]:
    """Per position, KL(dense || restricted) of the next-token distribution, in nats; the
    restriction as in ``token_logprobs`` (quantized pages, and/or sinks + window on some heads)."""
    p = _dense_logp(path, tuple(token_ids))
    q = _next_token_logp(path, token_ids, kv_quant=kv_quant, sink=sink, window=window, streaming=streaming)
    return (p.exp() * (p - q)).sum(-1).tolist()


@functools.lru_cache(maxsize=1)
def _dense_logp(path: str, token_ids: tuple[int, ...]) -> torch.Tensor:
    """The dense log-distributions of ``token_ids``, kept for the next call on the same tokens (the
    formats compared one after another on one prompt: 3.6 s each on 1,282 tokens, 2 cores)."""
    return _next_token_logp(path, list(token_ids))
