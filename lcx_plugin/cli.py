"""The ``lcx`` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _model(args) -> int:
    from lcx_plugin.harness.model import ModelPrepareError, model_dir, prepare

    if args.action == "path":
        print(model_dir())
        return 0
    try:
        print(prepare(force=args.force))
    except ModelPrepareError as e:
        print(f"lcx model: error: {e}", file=sys.stderr)
        return 2
    return 0


def _ab(args) -> int:
    from lcx_plugin.harness.ab.run import run

    return run(args)


def _demo(args) -> int:
    from lcx_plugin.harness.ab.demo import run

    return run(args)


def _config(args) -> int:
    from lcx_plugin.config import LcxConfigError, resolve_config

    if args.methods:
        return _methods()
    if args.model is None:
        from lcx_plugin.harness.model import model_dir

        args.model = str(model_dir())
    try:
        cfg = resolve_config({"lcx": json.loads(args.json)} if args.json else None, model=args.model,
                             engine=args.engine)
    except (LcxConfigError, json.JSONDecodeError) as e:
        print(f"lcx config: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _methods() -> int:
    import inspect

    from lcx_plugin import selectors

    for name in selectors.names():
        cls = selectors.get(name)
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        params = ", ".join(f"{f.name}={f.default!r}" for f in cls.params())
        print(f"{name}: {doc}\n    parameters: {params or '(none)'}")
    from lcx_plugin.config import DEFAULT_HIGH_FRACTION, KERNELS, KV_FORMATS

    print(f"engine keys, under every method: kernel={KERNELS[0]!r} (one of {list(KERNELS)}), "
          f"kv_format={KV_FORMATS[0]!r} (one of {list(KV_FORMATS)}), kv_group_size=None (channels per scale; "
          f"None: the whole head), kv_high_fraction=None (mixed: the share of a page's tokens with an int8 copy; "
          f"None: {DEFAULT_HIGH_FRACTION})")
    return 0


def _machine(args) -> int:
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.machine import cpu_info

    try:
        settings = choose()
    except ValueError as e:
        print(f"lcx machine: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(machine_record(settings), indent=2) if args.json else settings.line(cpu_info()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcx", description="lcx: long-context attention for vLLM and SGLang")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("model", help="the embedded SmolLM2-135M model")
    p.add_argument("action", choices=["prepare", "path"])
    p.add_argument("--force", action="store_true", help="convert again even if ready")
    p.set_defaults(fn=_model)

    p = sub.add_parser("ab", help="A/B test two arms (engines or endpoints) on long-context tasks and load")
    from lcx_plugin.harness.ab.run import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_ab)

    p = sub.add_parser("demo", help="the main job: stock vLLM against lcx's recommended default, with the verdict")
    from lcx_plugin.harness.ab.demo import add_arguments as add_demo

    add_demo(p)
    p.set_defaults(fn=_demo)

    p = sub.add_parser("config", help="validate an lcx config (JSON argument or $LCX_CONFIG) and print it; "
                       "with neither, the recommended default")
    p.add_argument("json", nargs="?")
    p.add_argument("--model", default=None, help="the served model's name or path, which picks the default when "
                   "no config is given (default: the embedded model)")
    p.add_argument("--engine", choices=("vllm", "sglang"), default="vllm",
                   help="the engine whose default to print (SGLang's keeps the model's dtype: no quantized pages)")
    p.add_argument("--methods", action="store_true", help="list the methods and their parameters")
    p.set_defaults(fn=_config)

    p = sub.add_parser("machine", help="this CPU and the engine settings lcx's own runs choose for it")
    p.add_argument("--json", action="store_true", help="the full machine record")
    p.set_defaults(fn=_machine)

    from lcx_plugin.harness.calibrate import add_parser as add_calibrate

    add_calibrate(sub)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
