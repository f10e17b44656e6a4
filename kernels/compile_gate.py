"""Compile gate: build every Triton kernel for sm_90 without a GPU and report its resources.

    python -m lcx_plugin.kernels.compile_gate        # prints one JSON line per kernel variant

Runs with the interpreter off (``TRITON_INTERPRET`` unset): ``triton.compile`` lowers to PTX
and a real sm_90 cubin; ``ptxas -v`` (bundled with Triton) then reports registers and spills.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

SHARED_LIMIT = 227 * 1024  # bytes of shared memory per block on sm_90


#: Quantized page formats the gate builds: (name, bits, group size; 0 = the whole head).
# int8 and the served int4 (whole-head groups); multi-group rows take the same load path (one scale
# per group, broadcast), run in the interpreter by tests/kernels/test_quant.py.
QUANT_FORMATS = (("int8-g0", 8, 0), ("int4-g0", 4, 0))


def quant_constexprs(head_dim: int, bits: int, group: int) -> dict:
    """The constexprs a quantized format's kernels take (as ``triton_impl.quant_operands`` sets them)."""
    from .paged import quant

    data = quant.code_bytes(head_dim, bits)
    return dict(QUANT_BITS=bits, GROUP_SIZE=min(group or head_dim, head_dim), META_AT=data + (data & 1))


def mixed_constexprs(head_dim: int, block_size: int = 128, fraction: float = 0.125, keys_only: bool = False) -> dict:
    """Mixed pages' constexprs (as ``triton_impl.quant_operands`` sets them): int4 rows and the
    int8 slot pool of a ``block_size`` page (vLLM CPU's 128 tokens: 16 slots, the most unrolled)."""
    from .paged import mixed, quant

    data8 = quant.code_bytes(head_dim, 8)
    const = dict(quant_constexprs(head_dim, 4, 0), HIGH_SLOTS=mixed.slot_count(block_size, fraction),
                 SLOT_BYTES=mixed.slot_bytes(head_dim, head_dim), HIGH_META_AT=data8 + (data8 & 1))
    if not keys_only:
        const["HIGH_ROW"] = quant.row_bytes(head_dim, 8, head_dim)
    return const


PLAIN = dict(QUANT_BITS=0, GROUP_SIZE=1, META_AT=0)
#: Pages without int8 slots (everything but mixed pages): the attention kernel's and the scoring kernel's.
UNMIXED = dict(HIGH_SLOTS=0, SLOT_BYTES=0, HIGH_META_AT=0, HIGH_ROW=0)
UNMIXED_KEYS = dict(HIGH_SLOTS=0, SLOT_BYTES=0, HIGH_META_AT=0)
#: Kernels that turn no key (no compacted positions, no position-neutral scores): no RoPE table.
UNTURNED = dict(inv_freq_ptr=None, ROT_DIM=0, NEOX=True)


@dataclass
class Variant:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    options: dict


def paged_attention_variants() -> list[Variant]:
    from .paged import triton_impl as t

    ptrs = ("q_ptr", "k_ptr", "v_ptr", "out_ptr")
    int_ptrs = ("block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr", "sel_idx_ptr", "sel_cnt_ptr",
                "sink_ptr", "window_ptr")
    strides = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kh", "stride_kt",
               "stride_kd", "stride_vb", "stride_vh", "stride_vt", "stride_vd", "stride_bt",
               "stride_sel_b", "stride_sel_h", "stride_sel_q")
    base_sig = {**{p: "*bf16" for p in ptrs}, **{p: "*i32" for p in int_ptrs}, "dense_ptr": "*i8",
                "scale": "fp32", **{s: "i64" for s in strides}, "num_query_blocks": "i32"}
    kinds = ((t.SEL_DENSE, 0, "dense"), (t.SEL_PAGE, 0, "page"), (t.SEL_TOKEN, 0, "token"),
             (t.SEL_PAGE, 64, "page,query_block=64"))
    out = []
    for head_dim in (64, 128):
        for sel_kind, query_block, sel_name in kinds:
            for fp32_dot in (False, True):
                launch = t.launch_config(head_dim, fp32_dot)
                const = dict(
                    NUM_KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16,
                    BLOCK_M=t.BLOCK_M, TILE_N=launch.pop("TILE_N"), SEL_KIND=sel_kind, QUERY_BLOCK=query_block,
                    FP32_DOT=fp32_dot, **PLAIN, **UNMIXED, **UNTURNED, COMPACT=False,
                )
                sig = dict(base_sig, **{k: "constexpr" for k in const})
                out.append(Variant(f"paged_attention[d={head_dim},{sel_name},fp32_dot={fp32_dot}]",
                                   t._paged_attention_kernel, sig, const, launch))
    # Quantized pages (dequantize-on-load): uint8 key/value byte planes, a bf16 or fp32 query.
    for head_dim in (64, 128):
        for fmt, bits, group in QUANT_FORMATS:
            for sel_kind, sel_name, fp32_dot in ((t.SEL_DENSE, "dense", False), (t.SEL_PAGE, "page", False),
                                                 (t.SEL_PAGE, "page", True)):
                launch = t.launch_config(head_dim, fp32_dot, bits)
                const = dict(
                    NUM_KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16,
                    BLOCK_M=t.BLOCK_M, TILE_N=launch.pop("TILE_N"), SEL_KIND=sel_kind, QUERY_BLOCK=0,
                    FP32_DOT=fp32_dot, **quant_constexprs(head_dim, bits, group), **UNMIXED, **UNTURNED,
                    COMPACT=False,
                )
                act = "*fp32" if fp32_dot else "*bf16"
                sig = dict(base_sig, q_ptr=act, out_ptr=act, k_ptr="*u8", v_ptr="*u8",
                           **{k: "constexpr" for k in const})
                out.append(Variant(f"paged_attention[d={head_dim},{fmt},{sel_name},fp32_dot={fp32_dot}]",
                                   t._paged_attention_kernel, sig, const, launch))
    # Mixed pages (int4 rows, int8 slots read where a token holds one): 128-token pages, page lists.
    for head_dim in (64, 128):
        for fp32_dot in (False, True):
            launch = t.launch_config(head_dim, fp32_dot, 4, mixed=True)
            const = dict(
                NUM_KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=128,
                BLOCK_M=t.BLOCK_M, TILE_N=launch.pop("TILE_N"), SEL_KIND=t.SEL_PAGE, QUERY_BLOCK=0,
                FP32_DOT=fp32_dot, **mixed_constexprs(head_dim), **UNTURNED, COMPACT=False,
            )
            act = "*fp32" if fp32_dot else "*bf16"
            sig = dict(base_sig, q_ptr=act, out_ptr=act, k_ptr="*u8", v_ptr="*u8", **{k: "constexpr" for k in const})
            out.append(Variant(f"paged_attention[d={head_dim},mixed,page,fp32_dot={fp32_dot}]",
                               t._paged_attention_kernel, sig, const, launch))
    # Compacted positions (``COMPACT``, length extrapolation): token lists at d=64 and page lists in
    # query blocks at d=128, neox over the whole head, a bf16 cache; and int8 pages with GPT-J pairs
    # over half the head.
    for head_dim, sel_kind, query_block, sel_name, fmt, rot, neox in (
            (64, t.SEL_TOKEN, 0, "token", None, 64, True), (128, t.SEL_PAGE, 64, "page,query_block=64", None, 128, True),
            (64, t.SEL_PAGE, 0, "page", "int8-g0", 32, False)):
        launch = t.launch_config(head_dim, False, 8 if fmt else 0, compact=True)
        quant_const = quant_constexprs(head_dim, 8, 0) if fmt else PLAIN
        const = dict(NUM_KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, BLOCK_M=t.BLOCK_M,
                     TILE_N=launch.pop("TILE_N"), SEL_KIND=sel_kind, QUERY_BLOCK=query_block, FP32_DOT=False,
                     **quant_const, **UNMIXED, COMPACT=True, ROT_DIM=rot, NEOX=neox)
        sig = dict(base_sig, inv_freq_ptr="*fp64", **({"k_ptr": "*u8", "v_ptr": "*u8"} if fmt else {}),
                   **{k: "constexpr" for k in const})
        out.append(Variant(f"paged_attention[d={head_dim},{fmt or 'bf16'},{sel_name},compacted,"
                           f"{'neox' if neox else 'gptj'} {rot}]", t._paged_attention_kernel, sig, const, launch))
    return out


def scoring_variants() -> list[Variant]:
    """The decode scoring kernels (``kernels/paged/scoring_triton.py``): token logits per head size
    and cache dtype, page bounds per head size; a GQA group of 4."""
    from .paged import scoring_triton as t

    strides = ("stride_qb", "stride_qh", "stride_ob", "stride_oh", "stride_bt")
    out = []
    for head_dim in (64, 128):
        for cache in ("bf16", "fp32"):
            launch = t.token_launch_config(head_dim)
            const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, TILE_N=launch.pop("TILE_N"),
                         **PLAIN, **UNMIXED_KEYS, **UNTURNED, NEUTRAL=False)
            sig = {"q_ptr": f"*{cache}", "k_ptr": f"*{cache}", "out_ptr": "*fp32", "block_table_ptr": "*i32",
                   "seq_lens_ptr": "*i32", "scale": "fp32", "out_len": "i32", "pages_per_program": "i32",
                   **{s: "i64" for s in strides + ("stride_kb", "stride_kh", "stride_kt", "stride_kd")},
                   **{k: "constexpr" for k in const}}
            out.append(Variant(f"token_logits[d={head_dim},{cache}]", t._token_logits_kernel, sig, const, launch))
        for fmt, bits, group in QUANT_FORMATS:  # quantized keys: the uint8 key plane, a bf16 query
            launch = t.token_launch_config(head_dim)
            const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, TILE_N=launch.pop("TILE_N"),
                         **quant_constexprs(head_dim, bits, group), **UNMIXED_KEYS, **UNTURNED, NEUTRAL=False)
            sig = {"q_ptr": "*bf16", "k_ptr": "*u8", "out_ptr": "*fp32", "block_table_ptr": "*i32",
                   "seq_lens_ptr": "*i32", "scale": "fp32", "out_len": "i32", "pages_per_program": "i32",
                   **{s: "i64" for s in strides + ("stride_kb", "stride_kh", "stride_kt", "stride_kd")},
                   **{k: "constexpr" for k in const}}
            out.append(Variant(f"token_logits[d={head_dim},{fmt}]", t._token_logits_kernel, sig, const, launch))
        launch = t.token_launch_config(head_dim)  # mixed pages' keys
        const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=128, TILE_N=launch.pop("TILE_N"),
                     **mixed_constexprs(head_dim, keys_only=True), **UNTURNED, NEUTRAL=False)
        sig = {"q_ptr": "*bf16", "k_ptr": "*u8", "out_ptr": "*fp32", "block_table_ptr": "*i32",
               "seq_lens_ptr": "*i32", "scale": "fp32", "out_len": "i32", "pages_per_program": "i32",
               **{s: "i64" for s in strides + ("stride_kb", "stride_kh", "stride_kt", "stride_kd")},
               **{k: "constexpr" for k in const}}
        out.append(Variant(f"token_logits[d={head_dim},mixed]", t._token_logits_kernel, sig, const, launch))
        # Position-neutral token logits (``NEUTRAL``: keys turned back by their positions), bf16 cache.
        launch = t.token_launch_config(head_dim)
        const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, TILE_N=launch.pop("TILE_N"),
                     **PLAIN, **UNMIXED_KEYS, NEUTRAL=True, ROT_DIM=head_dim, NEOX=True)
        sig = {"q_ptr": "*fp32", "k_ptr": "*bf16", "out_ptr": "*fp32", "block_table_ptr": "*i32",
               "seq_lens_ptr": "*i32", "scale": "fp32", "out_len": "i32", "pages_per_program": "i32",
               **{s: "i64" for s in strides + ("stride_kb", "stride_kh", "stride_kt", "stride_kd")},
               "inv_freq_ptr": "*fp64", **{k: "constexpr" for k in const}}
        out.append(Variant(f"token_logits[d={head_dim},bf16,position-neutral]", t._token_logits_kernel, sig, const,
                           launch))
        launch = t.page_launch_config(head_dim)
        const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_SIZE=16, PAGE_TILE=launch.pop("PAGE_TILE"))
        sig = {"q_ptr": "*bf16", "kmin_ptr": "*fp32", "kmax_ptr": "*fp32", "out_ptr": "*fp32",
               "block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "scale": "fp32", "out_len": "i32",
               **{s: "i64" for s in strides + ("stride_lo_b", "stride_lo_h", "stride_hi_b", "stride_hi_h")},
               **{k: "constexpr" for k in const}}
        out.append(Variant(f"page_logits[d={head_dim}]", t._page_logits_kernel, sig, const, launch))
    return out


def hip_search_variants() -> list[Variant]:
    """HiP's page search (``kernels/paged/hip_search_triton.py``): head sizes 64 and 128, k = 8
    and 64 pages (chunk vectors of 16 and 128; 64 pages is the default budget at 16-token pages)."""
    from .paged import hip_search_triton as t

    out = []
    for head_dim, k in ((64, 8), (128, 64)):
        launch = t.launch_config(head_dim)
        const = dict(K=k, BLOCK_M=max(16, 2 * k), HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=launch.pop("BLOCK_R"),
                     CHUNK_TILE=launch.pop("CHUNK_TILE"))
        sig = {"q_ptr": "*fp32", "c_ptr": "*fp32", "r_ptr": "*fp32", "hi_ptr": "*i32", "scratch_ptr": "*i32",
               "score_ptr": "*fp32",
               "pages_ptr": "*i32", "counts_ptr": "*i32", "lo": "i32", "n_rows": "i32", "n_rounds": "i32",
               **{s: "i64" for s in ("stride_qb", "stride_qh", "stride_qr", "stride_cp", "stride_ch")},
               **{k_: "constexpr" for k_ in const}}
        out.append(Variant(f"hip_search[d={head_dim},k={k}]", t._hip_search_kernel, sig, const, launch))
    return out


def all_variants() -> list[Variant]:
    """Every kernel variant the gate builds."""
    return paged_attention_variants() + scoring_variants() + hip_search_variants()


def _ptxas_report(ptx: str, arch: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "w").write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def _compile(index: int) -> dict:
    """Variant ``index`` of ``all_variants()`` built for sm_90 (in a worker process: variants hold
    jitted functions, so each worker rebuilds the list rather than receiving them)."""
    import triton
    from triton.backends.compiler import GPUTarget

    v = all_variants()[index]
    src = triton.compiler.ASTSource(v.fn, v.signature, v.constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=v.options)
    rep = _ptxas_report(k.asm["ptx"], "sm_90a")
    return {"kernel": v.name, **v.options, "shared_bytes": k.metadata.shared, "cubin_bytes": len(k.asm["cubin"]), **rep}


def compile_all() -> list[dict]:
    """Every variant, in order, compiled on every core (each build is independent)."""
    from concurrent.futures import ProcessPoolExecutor

    n = len(all_variants())
    with ProcessPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8))) as pool:
        return list(pool.map(_compile, range(n)))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_gate: unset TRITON_INTERPRET; the gate compiles for a real GPU target", file=sys.stderr)
        return 2
    for r in compile_all():
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
