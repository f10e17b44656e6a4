"""Quantized pages (``kv_format`` int8 / int4) on the embedded model: the engine's KV capacity,
passkey accuracy, next-token KL and decode speed for each format, and lcx's formats against vLLM's
own on the same captured keys and values, in one run.

    ./lcx bench kv_quant          # writes bench/results/kv_quant.json and .png

Arms, each a real vLLM engine with the machine's settings (``lcx machine``):
- stock bf16 (capacity and speed baseline) and dense lcx (accuracy baseline);
- stock with ``--kv-cache-dtype fp8`` (vLLM CPU's only quantized cache), where this CPU runs it;
- lcx dense attention over int8 pages and int4 pages (whole-head groups, the default);
- head split (the shipped calibrated pattern, 2 of 3 KV heads streaming, sink 64, window 256) over
  int4 pages: the composition whose capacity no engine format reaches.

Accuracy: passkey prompts at about 1k, 3k and 7k tokens, 24 per length (the prompts of
``bench/streaming.py``), strict scoring. Capacity: engine-reported KV tokens at bf16 for the same
``VLLM_CPU_KVCACHE_SPACE``. KL: mean KL(dense || format) of the next-token distribution over four
1k-token prompts, from the float32 reference model reading the same quantized values
(``tests/engine/reference_model.py``, which the engine tests hold the engine to). Speed: decode
tokens/s on one ~7k-token prompt against stock.

Formats side by side: keys, values and queries captured (after RoPE) from three layers of the
model on a ~4k-token prompt (in a process of its own: vLLM's kernels run in Triton's interpreter); each format's round trip (vLLM's run by its own store kernels in
Triton's interpreter, ``bench/engine_kv_formats.py``), then causal attention over the round-tripped
keys and values against attention over the originals: relative error of the output, and bytes
per token (all KV heads, K and V, scales included). Two alternatives lcx measured before settling
are in the table too: int4 without the Hadamard rotation of the keys, and int4 keys quantized per
channel over each 16-token page (KIVI's axis).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from head_split import _overall, _shape  # noqa: E402
from streaming import DEPTHS, LENGTHS, SEEDS_PER_DEPTH, _accuracy_prompts  # noqa: E402
from streaming import _accuracy as _streaming_accuracy  # noqa: E402

SPLIT = {"method": "head_split", "streaming_fraction": 0.6667, "sink": 64, "window": 256}
ARMS = [  # (format label, arm kwargs, (bits, group) or ("mixed", group, fraction) for the KL reference, streaming for KL)
    ("int8", {"backend": "lcx", "lcx": {"method": "dense", "kv_format": "int8"}}, (8, 64), False),
    ("int4", {"backend": "lcx", "lcx": {"method": "dense", "kv_format": "int4"}}, (4, 64), False),
    ("split+int4", {"backend": "lcx", "lcx": {**SPLIT, "kv_format": "int4"}}, (4, 64), True),
    ("mixed", {"backend": "lcx", "lcx": {"method": "dense", "kv_format": "mixed"}}, ("mixed", 64, 0.125), False),
]
FP8 = ("fp8", {"engine": {"kv_cache_dtype": "fp8"}})
CAPTURE_LAYERS = (2, 20)
MIXED_BLOCK = 128  # vLLM's CPU block size, as the engine arms run (mixed pages' slots are per page)
KL_PROMPTS = 4


def _accuracy(name: str, arm_kwargs: dict, samples, model: str, settings, log_dir: Path) -> dict:
    """The passkey run of bench/streaming.py; an arm's own engine arguments (fp8's cache dtype) join
    its engine settings."""
    from lcx_plugin.harness.ab.tasks import score
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    if "engine" not in arm_kwargs:
        return _streaming_accuracy(name, arm_kwargs, samples, model, settings, log_dir)
    kw = {k: v for k, v in arm_kwargs.items() if k != "engine"}
    spec = ArmSpec(model=model, prompts=[s.prompt for s in samples], max_tokens=16,
                   engine={"max_model_len": 8192, "enable_prefix_caching": False, **arm_kwargs["engine"]}, **kw)
    r = run_arm(spec, log_path=str(log_dir / f"streaming_acc_{name}.log"), settings=settings, timeout=7200)
    by_len: dict = {}
    for s, text in zip(samples, r["texts"]):
        by_len.setdefault(str(s.target_tokens), []).append(score(s, text).exact)
    return {"acc": {k: sum(v) / len(v) for k, v in by_len.items()}, "n": {k: len(v) for k, v in by_len.items()},
            "by_depth": {}, "outputs": r["texts"]}


def _speed(name: str, arm_kwargs: dict, model: str, settings, log_dir: Path) -> dict:
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    engine = {"enable_prefix_caching": False, **arm_kwargs.get("engine", {})}
    kw = {k: v for k, v in arm_kwargs.items() if k != "engine"}
    r = run_arm(ArmSpec(model=model, prompts=[long_prompt(7000, seed=11)], max_tokens=64, timing=True, repeats=2,
                        engine=engine, **kw),
                log_path=str(log_dir / f"kv_quant_speed_{name}.log"), settings=settings)
    return {"prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["ttft_s"][0], "decode_tps": r["decode_tps"][0],
            "kv_tokens": r["kv_capacity"]["tokens_bf16"], "block_size": r["kv_capacity"].get("block_size")}


def fp8_unsupported() -> str | None:
    """Why vLLM's CPU build cannot run its fp8 cache on this CPU (None: it can). Its CPU attention
    backend refuses fp8 without AVX-512 or AMX (``vllm/v1/attention/backends/cpu_attn.py``)."""
    import torch

    from lcx_plugin.machine import cpu_info

    if torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported():  # the checks vLLM makes
        return None
    return f"vLLM's CPU fp8 KV cache needs x86 with AVX-512 or AMX; this CPU ({cpu_info().line()}) has neither"


def _fp8_run(stock: dict, samples, model: str, settings, log_dir: Path) -> dict:
    speed = _speed("fp8", FP8[1], model, settings, log_dir)
    acc = _accuracy("kvq_fp8", FP8[1], samples, model, settings, log_dir)
    return {"format": "stock fp8", "kv_tokens": speed["kv_tokens"], "capacity_ratio": speed["kv_tokens"] / stock["kv_tokens"],
            "acc": _overall(acc), "acc_by_length": acc["acc"], "kl": None,
            "decode_tps_ratio": speed["decode_tps"] / stock["decode_tps"], "ttft_ratio": speed["ttft_s"] / stock["ttft_s"]}


def _add_format(path: Path, name: str, settings, model: str, samples, log_dir: Path, accuracy: bool) -> None:
    """Measure one lcx format into an existing result file: its capacity and speed against a stock
    run of its own, its KL, its row of the side-by-side table (on freshly captured tensors) and,
    with ``accuracy``, its passkey accuracy."""
    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import machine_record

    label, arm, fmt, streaming = next(a for a in ARMS if a[0] == name)
    result = json.loads(path.read_text())
    machine = machine_line(machine_record(settings))
    with Progress(5 + 2 * accuracy, f"bench kv_quant --add-format {name}") as progress:
        stock = _speed(f"stock-{name}-baseline", {}, model, settings, log_dir)
        progress.advance(note="stock speed")
        speed = _speed(name, arm, model, settings, log_dir)
        progress.advance(note=f"{name} speed")
        kl = _kl(model, samples, fmt, streaming, speed["block_size"])
        progress.advance(note=f"KL {kl:.4g}")
        row = {"format": label, "kv_tokens": speed["kv_tokens"], "capacity_ratio": speed["kv_tokens"] / stock["kv_tokens"],
               "acc": None, "kl": kl, "decode_tps_ratio": speed["decode_tps"] / stock["decode_tps"],
               "ttft_ratio": speed["ttft_s"] / stock["ttft_s"], "config": arm["lcx"],
               "note": f"measured by --add-format in a second run on {machine}; "
                       "speed ratios against that run's own stock"}
        if accuracy:
            acc = _accuracy(f"kvq_{name}", arm, samples, model, settings, log_dir)
            progress.advance(note=f"{name} passkey accuracy {_overall(acc):.3f}")
            dense = _dense_on_this_machine(result, machine, samples, model, settings, log_dir)
            progress.advance(note=f"dense passkey accuracy on this machine {dense:.3f}")
            row.update(acc=_overall(acc), acc_by_length=acc["acc"], by_depth=acc["by_depth"], outputs=acc["outputs"],
                       dense_acc_same_machine=dense)
        else:
            row["note"] += "; passkey accuracy not measured (run without --no-accuracy)"
        result["runs"] = [r for r in result["runs"] if r["format"] != label] + [row]
        path.write_text(json.dumps(result, indent=1))  # the row is kept whatever happens next
        side = None
        if name in LCX_FORMATS:  # a storage format of its own (split+int4 stores int4's pages)
            captured = capture(model)
            progress.advance(note="tensors captured")
            errs, nbytes = [], None
            for layer, (q, k, v) in captured.items():
                k_hat, v_hat, nbytes = _lcx_roundtrip(name, k, v, q)
                ref = _attn(q, k, v)
                errs.append(float((_attn(q, k_hat.float(), v_hat.float()) - ref).norm() / ref.norm()))
            side = {"format": name, "owner": "lcx", "bytes_per_token": nbytes,
                    "attn_out_rel_err": statistics.fmean(errs), "per_layer": dict(zip(map(str, captured), errs))}
            result["vs_engine_formats"] = [r for r in result["vs_engine_formats"]
                                           if not (r["owner"] == "lcx" and r["format"] == name)] + [side]
            path.write_text(json.dumps(result, indent=1))
        else:
            progress.advance(note=f"{name} stores another format's pages: no side-by-side row of its own")
        plot(result, path.with_suffix(".png"))
        progress.advance(note="side by side" if side else "plot")
        print(json.dumps({**{k: row.get(k) for k in ("format", "capacity_ratio", "acc", "kl", "decode_tps_ratio")},
                          **({"attn_out_rel_err": side["attn_out_rel_err"], "bytes_per_token": side["bytes_per_token"]}
                             if side else {})}))


def _dense_on_this_machine(result: dict, line: str, samples, model: str, settings, log_dir: Path) -> float:
    """Dense passkey accuracy on this machine (``line``: its machine line) and settings. A row
    added by a second run on another machine (another dtype) is compared with it rather than with
    the first run's dense; measured once per machine line and kept in the file (``dense_by_machine``)."""
    if line == result["machine_line"]:
        return result["dense_acc"]
    kept = result.setdefault("dense_by_machine", {})
    if line not in kept:
        acc = _accuracy("kvq_dense", {"backend": "lcx", "lcx": {"method": "dense"}}, samples, model, settings, log_dir)
        kept[line] = {"acc": _overall(acc), "acc_by_length": acc["acc"], "n": acc["n"]}
    return kept[line]["acc"]


def _add_fp8(path: Path, settings, model: str, samples, log_dir: Path) -> None:
    """Measure the fp8 arm (and stock again, for its speed ratios) into an existing result file."""
    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import machine_record

    result = json.loads(path.read_text())
    machine = machine_line(machine_record(settings))
    with Progress(3, "bench kv_quant --add-fp8") as progress:
        stock = _speed("stock-fp8-baseline", {}, model, settings, log_dir)
        progress.advance(note="stock speed")
        fp8 = _fp8_run(stock, samples, model, settings, log_dir)
        progress.advance(note=f"fp8: speed and passkey accuracy {fp8['acc']:.3f}")
        dense = _dense_on_this_machine(result, machine, samples, model, settings, log_dir)
        progress.advance(note=f"dense passkey accuracy on this machine {dense:.3f}")
    row = {**fp8, "dense_acc_same_machine": dense,
           "note": f"measured by --add-fp8 in a second run on {machine}; speed "
                   "ratios against that run's own stock"}
    result["runs"] = [row if r["format"] == "stock fp8" else r for r in result["runs"]]
    if not any(r["format"] == "stock fp8" for r in result["runs"]):
        result["runs"].insert(0, row)
    path.write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))
    print(json.dumps({k: row.get(k) for k in ("format", "capacity_ratio", "acc", "decode_tps_ratio")}))


def _kl(model: str, samples, fmt: tuple, streaming: bool, block_size: int | None = None) -> float:
    """Mean next-token KL(dense || format) over the first ``KL_PROMPTS`` 1k-token prompts (mixed
    pages: the engine's ``block_size``, each prompt one prefill chunk)."""
    from transformers import AutoTokenizer

    from lcx_plugin.selectors import get
    from tests.engine.reference_model import next_token_kl

    tok = AutoTokenizer.from_pretrained(model)
    extra = {}
    if streaming:
        params = {k: v for k, v in SPLIT.items() if k != "method"}
        extra = {"sink": SPLIT["sink"], "window": SPLIT["window"],
                 "streaming": get("head_split")(**params).streaming_mask(_shape(model))}
    short = [s for s in samples if s.target_tokens == LENGTHS[0]][:KL_PROMPTS]
    values = []
    for s in short:
        ids = tok(s.prompt)["input_ids"]
        spec = ("mixed", fmt[1], block_size, fmt[2], len(ids)) if fmt[0] == "mixed" else fmt
        values += next_token_kl(model, ids, spec, **extra)
    return statistics.fmean(values)


# -- formats side by side, on captured tensors --------------------------------------------------
def capture(model: str, tokens: int = 4096) -> dict[int, tuple]:
    """``{layer: (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])}`` float32, after RoPE."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from lcx_plugin.harness.prompts import long_prompt

    seen: dict[int, tuple] = {}

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx in CAPTURE_LAYERS:
            seen[module.layer_idx] = tuple(x[0].transpose(0, 1).contiguous() for x in (query, key, value))
        group = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("lcx_capture", record)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="lcx_capture").eval()
    ids = AutoTokenizer.from_pretrained(model)(long_prompt(tokens, seed=5))["input_ids"][:tokens]
    with torch.no_grad():
        m(torch.tensor([ids]))
    return seen


def _mixed_roundtrip(q, k, v, block_size: int = MIXED_BLOCK, fraction: float = 0.125):
    """Mixed pages filled from one prefill chunk (the captured prompt), slots chosen by its queries."""
    import torch

    from lcx_plugin.kernels.paged import BatchPlan, mixed

    t, hkv, d = k.shape
    pages = -(-t // block_size)
    kv = mixed.mixed(torch.full((pages, hkv, block_size, mixed.cell_bytes(d, d, block_size, fraction)), 255,
                                dtype=torch.uint8), d, d, fraction)
    slots = torch.arange(t)
    kv.write(k, v, slots)
    plan = BatchPlan.from_lists([t], [t], torch.arange(pages, dtype=torch.int32)[None])
    kv.promote(k, v, slots, mixed.observed_importance(q, k, plan, d ** -0.5))
    every = torch.arange(pages)
    kk, vv = kv.gather(every[:, None].expand(pages, hkv), torch.arange(hkv)[None].expand(pages, hkv))
    back = [x.permute(0, 2, 1, 3).reshape(pages * block_size, hkv, d)[:t] for x in (kk, vv)]
    return back[0], back[1], hkv * mixed.cell_bytes(d, d, block_size, fraction)


def _lcx_roundtrip(name: str, k, v, q=None):
    """(k_hat, v_hat, bytes per token over all KV heads) for lcx's served formats and the two
    measured alternatives."""
    import torch

    from lcx_plugin.kernels.paged import quant

    hkv, d = k.shape[1], k.shape[2]
    if name == "mixed":
        return _mixed_roundtrip(q, k, v)

    def rt(x, bits, group):
        return quant.decode(quant.encode(x, bits, group), x.shape[-1], bits, group)

    if name in ("int8", "int4", "int4-g32"):  # as served: int4 rotates keys (power-of-two head dim)
        bits, group = (8 if name == "int8" else 4), (32 if name.endswith("g32") else d)
        k_hat, v_hat = quant.round_trip(k, v, bits, group, quant.rotates_keys(d, bits))
        return k_hat, v_hat, 2 * hkv * quant.row_bytes(d, bits, group)
    if name == NO_ROTATION:
        return rt(k, 4, d), rt(v, 4, d), 2 * hkv * quant.row_bytes(d, 4, d)
    if name == PER_CHANNEL:
        t = k.shape[0] - k.shape[0] % 16
        pages = k[:t].reshape(-1, 16, hkv, d).permute(0, 2, 3, 1)  # [pages, Hkv, D, 16 tokens]
        back = rt(pages, 4, 16).permute(0, 3, 1, 2).reshape(t, hkv, d)
        k_hat = torch.cat([back, k[t:]])
        per_token = hkv * d * (8 + 4) / 16  # per channel and page: 16 codes (8 bytes) + scale and zero
        return k_hat, rt(v, 4, d), per_token + hkv * quant.row_bytes(d, 4, d)
    raise ValueError(name)


NO_ROTATION = "int4, keys not rotated (measured, not served)"
PER_CHANNEL = "int4, keys per channel per 16-token page (KIVI's axis; measured, not served)"
LCX_FORMATS = ("int8", "int4", "int4-g32", "mixed", NO_ROTATION, PER_CHANNEL)


def _attn(q, k, v):
    import torch

    group = q.shape[1] // k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1).repeat_interleave(group, 0)[None],
        v.transpose(0, 1).repeat_interleave(group, 0)[None], is_causal=True)
    return o[0]


def vs_engine_formats(captured: dict) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    from engine_kv_formats import ENGINE_FORMATS, engine_roundtrip

    rows = []
    names = [("lcx", n) for n in LCX_FORMATS] + [("vllm", n) for n in ENGINE_FORMATS]
    for owner, name in names:
        errs, nbytes, note = [], None, None
        for layer, (q, k, v) in captured.items():
            try:
                if owner == "lcx":
                    k_hat, v_hat, nbytes = _lcx_roundtrip(name, k, v, q)
                else:
                    res = engine_roundtrip(name, k, v)
                    k_hat, v_hat, nbytes = res.k_hat, res.v_hat, res.bytes_per_token
            except Exception as e:  # an engine format this CPU build cannot run: said in the table
                note = f"{type(e).__name__}: {e}"[:300]
                break
            ref = _attn(q, k, v)
            errs.append(float((_attn(q, k_hat.float(), v_hat.float()) - ref).norm() / ref.norm()))
            print(f"  {owner} {name} layer {layer}: rel err {errs[-1]:.4f}", flush=True)
        rows.append({"format": name, "owner": owner, "bytes_per_token": nbytes,
                     "attn_out_rel_err": statistics.fmean(errs) if errs else None,
                     "per_layer": dict(zip(map(str, captured), errs)), **({"error": note} if note else {})})
    return rows


def _formats_child(log_dir: Path) -> list[dict]:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "formats.json"
        with open(log_dir / "kv_quant_formats.log", "w") as log:
            subprocess.run([sys.executable, __file__, "--formats-only", str(out)], check=True, stdout=log,
                           stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
        return json.loads(out.read_text())


# -- the run ------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax = axes[0]
    ax.scatter([1.0], [result["dense_acc"]], marker="*", s=140, color="black", label="dense bf16")
    for r in result["runs"]:
        if r.get("acc") is not None:
            other = r.get("dense_acc_same_machine")
            label = r["format"] if other in (None, result["dense_acc"]) else f"{r['format']} (dense {other:.2f} on its machine)"
            ax.scatter([r["capacity_ratio"]], [r["acc"]], s=60, label=label)
    ax.axhline(result["dense_acc"] - 0.02, color="grey", lw=0.8, ls="--", label="dense - 2 pts")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("engine KV tokens / stock bf16 (same memory)")
    ax.set_ylabel(f"passkey exact-match (n={len(LENGTHS) * len(DEPTHS) * SEEDS_PER_DEPTH})")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for r in result["vs_engine_formats"]:
        if r.get("attn_out_rel_err") is None:
            continue
        marker = "o" if r["owner"] == "lcx" else "x"
        ax.scatter([r["bytes_per_token"]], [r["attn_out_rel_err"]], marker=marker, s=60,
                   label=f"{r['owner']} {r['format']}")
    ax.set_xlabel("bytes per token (K+V, all KV heads, scales included)")
    ax.set_ylabel("attention output relative error")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(f"quantized pages on SmolLM2-135M; {result['machine_line']}", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/kv_quant.json")
    ap.add_argument("--formats-only", metavar="JSON", help=argparse.SUPPRESS)  # the side-by-side child
    ap.add_argument("--capture-tokens", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--add-format", choices=[a[0] for a in ARMS],
                    help="measure one lcx format into the existing --out (a stock baseline of its own)")
    ap.add_argument("--no-accuracy", action="store_true", help="with --add-format: skip the passkey accuracy run")
    ap.add_argument("--add-fp8", action="store_true",
                    help="measure only vLLM's fp8 cache (with a stock baseline of its own) into the existing --out")
    args = ap.parse_args()
    if args.formats_only:
        from lcx_plugin.harness.model import prepare

        rows = vs_engine_formats(capture(str(prepare()), args.capture_tokens))
        Path(args.formats_only).write_text(json.dumps(rows))
        return 0

    if args.add_fp8 and (why := fp8_unsupported()):
        raise SystemExit(f"--add-fp8: {why}; run it on a machine that has one")

    from transformers import AutoTokenizer

    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.machine import cpu_info

    settings = choose()
    print(settings.line(cpu_info()), flush=True)
    model = str(prepare())
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_record(settings)
    samples = _accuracy_prompts(AutoTokenizer.from_pretrained(model))
    if args.add_fp8:
        _add_fp8(Path(args.out), settings, model, samples, log_dir)
        return 0
    if args.add_format:
        _add_format(Path(args.out), args.add_format, settings, model, samples, log_dir, not args.no_accuracy)
        return 0
    result: dict = {"machine": machine, "machine_line": machine_line(machine)}
    with Progress(4 + 3 * len(ARMS), "bench kv_quant") as progress:
        stock = _speed("stock", {}, model, settings, log_dir)
        result["stock_kv_tokens"] = stock["kv_tokens"]
        progress.advance(note=f"stock: {stock}")
        dense = _accuracy("kvq_dense", {"backend": "lcx", "lcx": {"method": "dense"}}, samples, model, settings, log_dir)
        result["dense"] = {k: dense[k] for k in ("acc", "n", "by_depth")}
        result["dense_acc"] = _overall(dense)
        progress.advance(note=f"dense {dense['acc']}")
        runs = []
        try:  # vLLM CPU's fp8 cache: accuracy and capacity where this CPU build runs it
            why = fp8_unsupported()
            runs.append({"format": "stock fp8", "error": why} if why else _fp8_run(stock, samples, model, settings,
                                                                                    log_dir))
        except Exception as e:
            runs.append({"format": "stock fp8", "error": f"{type(e).__name__}: {str(e)[-400:]}"})
        progress.advance(note=f"fp8: {runs[-1].get('acc', runs[-1].get('error', '')[:80])}")
        for name, arm, fmt, streaming in ARMS:
            acc = _accuracy(f"kvq_{name}", arm, samples, model, settings, log_dir)
            progress.advance(note=f"{name}: {acc['acc']}")
            speed = _speed(name, arm, model, settings, log_dir)
            progress.advance(note=f"{name}: {speed}")
            kl = _kl(model, samples, fmt, streaming, speed["block_size"])
            progress.advance(note=f"{name}: KL {kl:.4g}")
            runs.append({"format": name, "kv_tokens": speed["kv_tokens"],
                         "capacity_ratio": speed["kv_tokens"] / stock["kv_tokens"], "acc": _overall(acc),
                         "acc_by_length": acc["acc"], "by_depth": acc["by_depth"], "kl": kl,
                         "decode_tps_ratio": speed["decode_tps"] / stock["decode_tps"],
                         "ttft_ratio": speed["ttft_s"] / stock["ttft_s"], "config": arm["lcx"],
                         "outputs": acc["outputs"]})
        result["runs"] = runs
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(result, indent=1))
        try:
            result["vs_engine_formats"] = _formats_child(Path(log_dir))
        except Exception as e:  # keep the engine runs; say what failed
            result["vs_engine_formats"] = [{"format": "-", "owner": "-", "error": f"{type(e).__name__}: {e}"}]
        progress.advance(note="formats side by side")
    result["speed_stock_7k"] = stock
    result["setup"] = {
        "lengths": LENGTHS, "depths": DEPTHS, "seeds_per_depth": SEEDS_PER_DEPTH,
        "scoring": "strict: the output's 5-digit numbers are exactly the pass key",
        "capacity": "engine-reported KV tokens at bf16 for the same VLLM_CPU_KVCACHE_SPACE, max_model_len 8192",
        "kl": f"mean next-token KL(dense || format), float32 reference model, {KL_PROMPTS} prompts of ~{LENGTHS[0]} tokens",
        "vs_engine_formats": f"layers {list(CAPTURE_LAYERS)} of a ~4096-token prompt, q/k/v after RoPE, float32; "
                             "causal attention over round-tripped k/v vs the originals",
        "split": SPLIT}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"stock_kv_tokens": result["stock_kv_tokens"], "dense_acc": result["dense_acc"],
                      "runs": [{k: r.get(k) for k in ("format", "capacity_ratio", "acc", "kl", "decode_tps_ratio", "error")}
                               for r in runs],
                      "vs_engine_formats": [{k: r.get(k) for k in ("format", "bytes_per_token", "attn_out_rel_err")}
                                            for r in result["vs_engine_formats"]]}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
