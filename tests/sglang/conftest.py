"""SGLang adapter tests: they run in the SGLang environment (envs/setup.sh sglang), which
``./lcx test`` runs after the vLLM suite; in the vLLM environment this folder is skipped."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("sglang") else ["test_*.py"]
