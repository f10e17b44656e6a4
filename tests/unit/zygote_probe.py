"""A child module for tests/unit/test_zygote.py: reports what it sees, then exits as told."""
import json
import os
import sys
import time

if __name__ == "__main__":
    out, action = sys.argv[1], sys.argv[2]
    print("probe says hello", flush=True)
    print("probe warns", file=sys.stderr, flush=True)
    with open(out, "w") as f:
        json.dump({"argv": sys.argv, "name": __name__, "env": os.environ.get("ZYGOTE_PROBE"),
                   "leaked": os.environ.get("ZYGOTE_PARENT_ONLY"), "vllm_preloaded": "vllm" in sys.modules}, f)
    if action == "sleep":
        time.sleep(60)
    raise SystemExit(3 if action == "fail" else 0)
