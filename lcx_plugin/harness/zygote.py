"""Engine children forked from a process that has already imported vLLM.

Every engine job of the harness runs in a child process of its own (``launcher.run_child``).
Started with ``python -m``, each child spends about 7 s importing torch, transformers and vLLM
before its engine starts (measured on a 2-core EPYC), and the test suite starts some 50 of them.
Here a multiprocessing *forkserver* imports those once (``PRELOAD``) and forks each child from
that state: a fresh process, as before, with the imports done. (vLLM's own engine-core and worker
processes cannot be helped this way: on CPU its platform sets ``VLLM_WORKER_MULTIPROC_METHOD=spawn``,
so each of them imports vLLM afresh, about 7 s on 2 cores.)

The child then becomes what ``python -m MODULE JOB OUT`` would have been: its environment is the
job's, its stdout and stderr go to the job's log, ``sys.argv`` is set, the module runs as
``__main__``, and the exit handlers run before it exits (vLLM shuts its workers down in them).
``LCX_FORKSERVER=0`` turns this off (every child started by ``python -m``); a parent run as a
script always is (``enabled``). A forked child inherits none of the parent's descriptors: what it
must hand back beyond its result goes through a file (``ab.arms.relayed``).
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import runpy
import subprocess
import sys

#: Imported once in the forkserver: what every engine child imports before its engine starts.
PRELOAD = ["lcx_plugin.harness.zygote_imports"]
ENV = "LCX_FORKSERVER"


def enabled() -> bool:
    """On unless ``LCX_FORKSERVER=0``, where this process was started as ``python -m MODULE``
    (pytest; ``./lcx``, which runs lcx's CLI as ``python -m lcx_plugin.cli``; not the ``lcx``
    console script). A forked child re-imports the parent's main module (multiprocessing's
    rule); a module run by name is skipped there or guarded, a script run by path might not be, so
    a script (``./lcx bench NAME`` runs bench/NAME.py) starts its children with ``python -m``."""
    main = sys.modules.get("__main__")
    return os.environ.get(ENV, "1") != "0" and getattr(main, "__spec__", None) is not None


@functools.cache
def _ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _child(module: str, argv: list[str], env: dict, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    multiprocessing.current_process().name = "MainProcess"  # as a ``python -m`` child's log lines read
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # multiprocessing ends children with os._exit, which skips them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(module: str, argv: list[str], env: dict, log_path: str, timeout: float | None) -> int:
    """Run ``module`` as ``__main__`` in a child forked from the forkserver and return its exit
    code; a child that outlives ``timeout`` is killed and ``subprocess.TimeoutExpired`` raised, as
    ``subprocess.run`` does."""
    proc = _ctx().Process(target=_child, args=(module, list(argv), dict(env), str(log_path)), daemon=False)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired([sys.executable, "-m", module, *argv], timeout)
    return proc.exitcode
