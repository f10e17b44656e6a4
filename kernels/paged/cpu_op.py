"""The native CPU op for decode over quantized pages, and its build.

On a CPU, the torch twin's quantized decode (``torch_impl._decode_page_lists``, ``_decode_batch``,
``window._decode_rows_codes``) costs two dozen small tensor operations per layer: gathers of
code rows, conversions, grouped products, a softmax. At decode's sizes (a few hundred candidates
per sequence and head) their fixed costs dominate, and a step over int8 pages ran slower than the
engine's own bf16 op (bench/results/decode_profile.json). ``cpu_op.c`` does the same work in one
call per layer: for each (sequence, KV head) it reads its candidates' codes where they lie, scores
them against the head's queries, takes the softmax and sums the values, all in float32.

**Contract** (``decode_codes``): candidates as spans ``(block, lo, hi)`` per (sequence, KV head),
the offsets ``[lo, hi)`` of one physical block, padding spans having ``block < 0`` or ``lo >=
hi``; optionally one more candidate per row, the step's own key and value (unquantized). Keys are
scored as stored: a caller with rotated keys passes the rotated query (``QuantKVFormat.rotate_query``).
Same tests as the twin: ``tests/kernels/test_cpu_op.py`` holds it to a float64 reference.

**Build.** The C file is compiled at first use with the machine's C compiler (``$LCX_CC``, else
``cc``; ``-O3 -march=native -fopenmp``, about a second) into ``cpu_op/`` under lcx's cache
(``$LCX_CACHE_DIR``, else ``~/.cache/lcx``; or ``$LCX_CPU_OP_CACHE``), keyed by the source, the
flags and the CPU's feature flags, and loaded with ctypes: no torch headers, no Python extension
ABI. torch's wheels ship their own ``libgomp.so.1``, already loaded when the op is, so its OpenMP
calls resolve to it: the op runs on torch's threads (and vLLM's binding of them), not a second pool. Without a compiler, or with ``LCX_CPU_OP=0``, the twin's torch paths
serve (the same results within float32 rounding), and lcx says so once.

**Writing** (``encode_write``): keys and values quantized where they land, the same bytes as
``quant.encode``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("lcx")

SOURCE = Path(__file__).with_name("cpu_op.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
_ERRORS = {1: "bad parameters", 2: "out of memory", 3: "a span outside the cache (block or offset out of range)",
           4: "a slot outside the cache"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def enabled() -> bool:
    """Whether the op may serve (``LCX_CPU_OP=0`` turns it off; read at every call)."""
    return os.environ.get("LCX_CPU_OP", "1") != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("LCX_CC") or "cc"


def library_path() -> Path:
    """Where the compiled op for this source, compiler, flags and CPU lives."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), _compiler(), *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LCX_CPU_OP_CACHE")
                or Path(os.environ.get("LCX_CACHE_DIR") or Path.home() / ".cache" / "lcx") / "cpu_op")
    return root / f"lcx_cpu_op-{key}.so"


def _build(path: Path) -> None:
    cc = shutil.which(_compiler())
    if cc is None:
        raise RuntimeError(f"no C compiler {_compiler()!r} on PATH (set $LCX_CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # built aside, then moved in whole:
    os.close(fd)  # concurrent engine processes never load a half-written library
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-600:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        _build(path)
        log.info("lcx: built the native CPU decode op at %s", path)
    lib = ctypes.CDLL(str(path))
    f = lib.lcx_decode_codes
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [p, p, i64, i64, i64, i64, i64, p, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, p, p,
                  ctypes.c_float, p]
    f.restype = ctypes.c_int
    f = lib.lcx_page_list_spans
    f.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i64, i64, i64, i64, i64, p]
    f.restype = ctypes.c_int
    f = lib.lcx_summaries_update
    f.argtypes = [p, i64, i64, i64, i64, i64, i64, p, i64, i64, p, p, p, p]
    f.restype = ctypes.c_int
    f = lib.lcx_encode_write
    f.argtypes = [p, p, i64, i64, i64, i64, i64, i64, i64, p, p, i64, i64, i64, i64, i64, i64, i64, i64, i64]
    f.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded op, building it on first use; None when disabled or it cannot be built (logged once)."""
    global _lib, _failed
    if not enabled():
        return None
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _load()
            except Exception as exc:  # noqa: BLE001 - any failure means: serve with the torch paths
                _failed = str(exc)
                log.warning("lcx: the native CPU decode op is unavailable (%s); quantized decode runs on the "
                            "torch twin, slower", _failed)
    return _lib


def _required() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native CPU op is not available: {_failed or 'disabled (LCX_CPU_OP=0)'}")
    return lib


def _rows_and_slots(x: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[T, H, D]`` as the op reads rows (float32 or bfloat16, channels contiguous) and the
    first ``T`` slots as int64."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    slots = slot_mapping[: x.shape[0]].to(torch.int64).contiguous()
    if slots.shape[0] < x.shape[0]:
        raise ValueError(f"slot_mapping holds {slots.shape[0]} slots for {x.shape[0]} tokens")
    return x, slots


def available() -> bool:
    return library() is not None


def serves(kv, query: torch.Tensor) -> bool:
    """Whether ``decode_codes`` can serve this cache and query: quantized pages on the CPU, op built."""
    from .quant import QuantKVFormat

    return (isinstance(kv, QuantKVFormat) and kv.raw.device.type == "cpu" and not query.is_cuda
            and kv.raw.stride(-1) == 1 and available())


def decode_codes(query: torch.Tensor, kv, spans: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                 own_key: torch.Tensor | None = None, own_value: torch.Tensor | None = None) -> torch.Tensor:
    """``query`` ``[n, Hq, D]`` (float32; rotated when the keys are) over quantized pages ``kv``
    (``QuantKVFormat``) -> ``[n, Hq, D]`` float32 (into ``out`` when given, contiguous float32).

    ``spans`` int32 ``[n, Hkv, W, 3]`` or ``[n, W, 3]`` (the same spans for every KV head):
    ``(block, lo, hi)``. ``own_key``/``own_value`` ``[n, Hkv, D]``: one more candidate per row."""
    lib = _required()
    n, hq, d = query.shape
    nb, hkv, bs, _ = kv.raw.shape
    if d != kv.head_dim or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} does not fit a cache of {hkv} heads x {kv.head_dim}")
    q = query.float().contiguous()
    spans = spans.to(torch.int32).contiguous()
    if spans.dim() == 3:
        span_seq, span_head, w = spans.shape[1] * 3, 0, spans.shape[1]
    elif spans.dim() == 4 and spans.shape[1] == hkv:
        span_seq, span_head, w = hkv * spans.shape[2] * 3, spans.shape[2] * 3, spans.shape[2]
    else:
        raise ValueError(f"spans must be [n, {hkv}, W, 3] or [n, W, 3], got {tuple(spans.shape)}")
    if spans.shape[0] != n or spans.shape[-1] != 3:
        raise ValueError(f"spans {tuple(spans.shape)} do not match {n} query rows")
    if out is None:
        out = torch.empty(n, hq, d, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (n, hq, d):
        raise ValueError(f"out must be contiguous float32 [{n}, {hq}, {d}], got {out.dtype} {tuple(out.shape)}")
    ok, ov = None, None
    if own_key is not None:
        ok, ov = own_key.float().contiguous(), own_value.float().contiguous()
        if tuple(ok.shape) != (n, hkv, d) or ok.shape != ov.shape:
            raise ValueError(f"own key/value must be [{n}, {hkv}, {d}], got {tuple(ok.shape)}/{tuple(ov.shape)}")
    raw = kv.raw
    sb, sh, st, _ = raw.stride()
    rc = lib.lcx_decode_codes(q.data_ptr(), raw.data_ptr(), sb, sh, st, nb, bs, spans.data_ptr(), span_seq,
                              span_head, w, n, hkv, hq // hkv, d, kv.bits, kv.group_size, kv.row_bytes,
                              None if ok is None else ok.data_ptr(), None if ov is None else ov.data_ptr(),
                              float(scale), out.data_ptr())
    if rc:
        raise ValueError(f"lcx native decode: {_ERRORS.get(rc, f'error {rc}')}")
    return out


def encode_write(kv, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``QuantKVFormat.write`` natively: ``key``/``value`` ``[T, Hkv, D]`` (float32 or bfloat16, any
    token and head strides, channels contiguous; keys already rotated when the format rotates them)
    quantized into ``slot = block * block_size + offset``, negative slots skipped: the same bytes
    as ``quant.encode`` (tests/kernels/test_cpu_op.py holds them equal)."""
    lib = _required()
    t, h, d = key.shape
    if value.shape != key.shape or (h, d) != (kv.num_kv_heads, kv.head_dim):
        raise ValueError(f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not fit a cache of "
                         f"{kv.num_kv_heads} heads x {kv.head_dim}")
    if value.dtype != key.dtype:
        key, value = key.float(), value.float()
    key, slots = _rows_and_slots(key, slot_mapping)
    value, _ = _rows_and_slots(value, slot_mapping)
    raw = kv.raw
    nb, _, bs, _ = raw.shape
    sb, sh, st, _ = raw.stride()
    rc = lib.lcx_encode_write(key.data_ptr(), value.data_ptr(), int(key.dtype == torch.bfloat16), key.stride(0),
                              key.stride(1), value.stride(0), value.stride(1), t, h, slots.data_ptr(), raw.data_ptr(),
                              sb, sh, st, nb, bs, d, kv.bits, kv.group_size, kv.row_bytes)
    if rc:
        raise ValueError(f"lcx native write: {_ERRORS.get(rc, f'error {rc}')}")


def _int32_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 and x.stride(-1) == 1 else x.to(torch.int32).contiguous()


def page_list_spans(indices: torch.Tensor, counts: torch.Tensor, lens: torch.Tensor, block_table: torch.Tensor,
                    block_size: int) -> torch.Tensor:
    """A decode selection of page lists as ``decode_codes``' spans ``[B, Hkv, K, 3]``: ``indices``
    ``[B, Hkv, K]`` logical pages, ``counts`` ``[B, Hkv]``, ``lens`` ``[B]``, the plan's
    ``block_table`` ``[B, P]``. Listed page ``j`` becomes (its block, 0, its length up to the
    query at ``lens - 1``) when ``j < count`` and it holds a position up to the query; padding
    otherwise (the twin's ``_decode_page_lists`` masks the same)."""
    lib = _required()
    idx, cnt, table = _int32_rows(indices), counts.to(torch.int32), _int32_rows(block_table)
    lens = lens.to(torch.int64).contiguous()
    b, hkv, k = idx.shape
    if tuple(cnt.shape) != (b, hkv) or lens.shape[0] < b or table.shape[0] < b:
        raise ValueError(f"page lists {tuple(idx.shape)}, counts {tuple(cnt.shape)}, {lens.shape[0]} lengths and "
                         f"{table.shape[0]} block-table rows do not match")
    spans = torch.empty(b, hkv, k, 3, dtype=torch.int32)
    rc = lib.lcx_page_list_spans(idx.data_ptr(), idx.stride(0), idx.stride(1), cnt.data_ptr(), cnt.stride(0),
                                 cnt.stride(1), lens.data_ptr(), table.data_ptr(), table.stride(0), table.shape[1],
                                 b, hkv, k, block_size, spans.data_ptr())
    if rc:
        raise ValueError(f"lcx native page lists: {_ERRORS.get(rc, f'error {rc}')}")
    return spans


def summaries_update(pages, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``state.PageSummaries.update`` natively: keys ``[T, Hkv, D]`` (float32 or bfloat16, channels
    contiguous) at ``slot_mapping`` folded into their pages' min, max, sum and count; a page
    written from its first slot is reset first."""
    lib = _required()
    t, h, d = key.shape
    if tuple(pages.min.shape[1:]) != (h, d):
        raise ValueError(f"keys {tuple(key.shape)} do not fit summaries of {tuple(pages.min.shape[1:])}")
    key, slots = _rows_and_slots(key, slot_mapping)
    rc = lib.lcx_summaries_update(key.data_ptr(), int(key.dtype == torch.bfloat16), key.stride(0), key.stride(1), t,
                                  h, d, slots.data_ptr(), pages.min.shape[0], pages.block_size, pages.min.data_ptr(),
                                  pages.max.data_ptr(), pages.sum.data_ptr(), pages.count.data_ptr())
    if rc:
        raise ValueError(f"lcx native page summaries: {_ERRORS.get(rc, f'error {rc}')}")
