"""Every lcx config the docs show as a JSON block (one with a "method") is one the config parser
accepts: a documented config that stops the engine at startup is a defect."""
import json
import re
from pathlib import Path

import pytest

from lcx_plugin.config import LcxConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]


def _blocks():
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"```json\n(.*?)```", text, re.S):
            line = text[: m.start()].count("\n") + 2
            try:
                data = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue  # a response or report shown as JSON, not a config
            if isinstance(data, dict) and "method" in data:
                yield pytest.param(data, id=f"{doc.relative_to(ROOT)}:{line}")


CONFIGS = list(_blocks())


def test_the_docs_show_configs():
    assert len(CONFIGS) >= 5, CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_documented_config_parses(config):
    LcxConfig.from_dict(config, "README")
