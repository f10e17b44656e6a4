"""Smoke check for bench/engine_kv_formats.py: vLLM's own KV-cache formats on random K/V.

    TRITON_INTERPRET=1 python bench/check_engine_kv_formats.py [--tokens 256] [--no-verify]
                                                              [--check-interpreter-patch]

(The module sets TRITON_INTERPRET=1 itself when nothing has imported vLLM's kernels yet.)

For each format: bytes per token (K+V, all KV heads, one layer, from the engine's KV-cache spec),
relative RMS reconstruction error of k_hat / v_hat, and the wall time. Then, unless --no-verify,
a small case (T=48, 2 decode queries, 9 query heads) checks each dequantizer against the engine's
own attention kernel run on the same quantized cache. Exits 1 when an error is NaN or above 50%, or
when a dequantizer disagrees with the engine's kernel.

--check-interpreter-patch: runs every format (T=64, 2 decode queries: store, dequant and attention
kernels) in two subprocesses, with and without the module's interpreter speed-ups
(LCX_ENGINE_KV_PLAIN_INTERPRETER=1), and requires bit-identical k_hat, v_hat and out.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.engine_kv_formats import (  # noqa: E402
    BASELINE_FORMAT,
    ENGINE_FORMATS,
    load_engine,
    engine_roundtrip,
    verify_against_engine_attention,
)

# Dequantizer vs the engine's attention kernel, relative max-abs. fp8/int8/int4 read the same
# numbers the kernel does (agreement ~1e-6); turboquant's k_hat/v_hat come from the engine's
# dequant kernel, which writes fp16, hence ~1e-3.
VERIFY_TOL = {"turboquant_3bit_nc": 5e-3}
VERIFY_TOL_DEFAULT = 1e-4


def rel_rms(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x = x.float()
    return ((x_hat - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


def dump(path: str) -> None:
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(64, 3, 64, generator=g), torch.randn(64, 3, 64, generator=g)
    q = torch.randn(2, 9, 64, generator=g)
    res = {}
    for fmt in (BASELINE_FORMAT,) + ENGINE_FORMATS:
        r = engine_roundtrip(fmt, k, v, q=q)
        res[fmt] = (r.k_hat, r.v_hat, r.out)
    torch.save(res, path)


def check_interpreter_patch() -> bool:
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, plain in (("patched", "0"), ("plain", "1")):
            paths[name] = os.path.join(d, name + ".pt")
            env = dict(os.environ, LCX_ENGINE_KV_PLAIN_INTERPRETER=plain)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--dump", paths[name]], env=env, check=True)
            print(f"  {name} interpreter: {time.perf_counter() - t0:.1f} s")
        a, b = torch.load(paths["patched"]), torch.load(paths["plain"])
    same = True
    for fmt in a:
        eq = [torch.equal(x, y) for x, y in zip(a[fmt], b[fmt])]
        print(f"  {fmt:22s} k_hat/v_hat/out identical: {eq}")
        same = same and all(eq)
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--check-interpreter-patch", action="store_true")
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.dump)
        return 0

    g = torch.Generator().manual_seed(0)
    T, H, D = args.tokens, args.kv_heads, args.head_dim
    k = torch.randn(T, H, D, generator=g)
    v = torch.randn(T, H, D, generator=g)

    t0 = time.perf_counter()
    load_engine()  # imports vLLM and builds its kernels (interpreted) once, outside the timings
    print(f"loading vLLM's kernels: {time.perf_counter() - t0:.1f} s")

    ok = True
    print(f"random K/V: T={T} Hkv={H} D={D}, block_size=16, float32 input, workers={args.workers}")
    print(f"{'format':22s} {'bytes/token':>11s} {'x bf16':>7s} {'k rel-RMS':>10s} {'v rel-RMS':>10s} {'time s':>7s}")
    base = None
    for fmt in (BASELINE_FORMAT,) + ENGINE_FORMATS:
        t0 = time.perf_counter()
        r = engine_roundtrip(fmt, k, v, workers=args.workers)
        dt = time.perf_counter() - t0
        ek, ev = rel_rms(r.k_hat, k), rel_rms(r.v_hat, v)
        base = base or r.bytes_per_token
        print(f"{fmt:22s} {r.bytes_per_token:11.1f} {base / r.bytes_per_token:7.2f} {ek:10.4f} {ev:10.4f} {dt:7.1f}")
        if fmt != BASELINE_FORMAT and not (math.isfinite(ek) and math.isfinite(ev) and ek <= 0.5 and ev <= 0.5):
            print(f"  FAIL: {fmt} reconstruction error absurd or NaN")
            ok = False

    if not args.no_verify:
        Tv, Hq = 48, 3 * H
        kq = torch.randn(Tv, H, D, generator=g)
        vq = torch.randn(Tv, H, D, generator=g)
        q = torch.randn(2, Hq, D, generator=g)
        print(f"\ndequantizer vs the engine's attention kernel (T={Tv}, 2 decode queries, Hq={Hq}):")
        print(f"{'format':22s} {'|out-attn(k_hat,v_hat)|':>24s} {'|out-attn(k,v)|':>16s} {'time s':>7s}")
        for fmt in ENGINE_FORMATS:
            t0 = time.perf_counter()
            d_hat, d_exact = verify_against_engine_attention(fmt, kq, vq, q)
            dt = time.perf_counter() - t0
            tol = VERIFY_TOL.get(fmt, VERIFY_TOL_DEFAULT)
            flag = "" if d_hat <= tol else f"  FAIL (> {tol:g})"
            print(f"{fmt:22s} {d_hat:24.2e} {d_exact:16.4f} {dt:7.1f}{flag}")
            ok = ok and d_hat <= tol
        print("(relative max-abs differences of the engine kernel's output)")

    if args.check_interpreter_patch:
        print("\ninterpreter speed-ups vs the stock interpreter (T=64, 2 queries, all kernels):")
        same = check_interpreter_patch()
        if not same:
            print("  FAIL: results differ")
        ok = ok and same

    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
