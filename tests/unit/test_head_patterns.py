"""Head-pattern files: lcx's own JSON and DuoAttention's TSV, and one clear error for each bad file."""
import json

import pytest
import torch

from lcx_plugin import head_patterns
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.head_patterns import HeadPattern, ModelShape

SHAPE = ModelShape(4, 3, 64, "toy-model")


def _scores():
    return torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.05, 0.6, 0.7], [0.4, 0.0, 1.0]], dtype=torch.float64)


def test_lcx_json_round_trips_and_records_the_model(tmp_path):
    p = HeadPattern(_scores(), SHAPE, {"method": "mass"}).save(tmp_path / "p.json")
    back = head_patterns.load(p)
    assert back.model == SHAPE and torch.equal(back.scores, _scores()) and back.source == {"method": "mass"}
    assert back.check(SHAPE) == []
    assert back.check(ModelShape(4, 3, 128)) == ["it was made for head_dim 64, the served model has 128"]
    assert "5 x 3" in back.check(ModelShape(5, 3, 64))[0]


def test_duo_attention_tsv_layout(tmp_path):
    """Layers x KV heads, tab-separated, as DuoAttention releases full_attention_heads.tsv."""
    p = tmp_path / "full_attention_heads.tsv"
    p.write_text("\n".join("\t".join(f"{x:.4f}" for x in row) for row in _scores().tolist()) + "\n")
    pat = head_patterns.load(p)
    assert pat.model is None and pat.scores.shape == (4, 3)
    torch.testing.assert_close(pat.scores, _scores())
    assert pat.check(SHAPE) == [] and pat.check(ModelShape(4, 2, 64))


def test_masks_by_fraction_and_by_threshold():
    pat = HeadPattern(_scores(), SHAPE)
    m = pat.streaming_mask(streaming_fraction=1 / 3)
    assert int(m.sum()) == 4
    assert m.flatten().tolist() == (_scores().flatten() <= 0.2).tolist()  # the four lowest scores stream
    assert int(pat.streaming_mask(streaming_fraction=0.0).sum()) == 0
    assert bool(pat.streaming_mask(streaming_fraction=1.0).all())
    assert torch.equal(pat.streaming_mask(threshold=0.5), _scores() < 0.5)
    per_layer = pat.streaming_mask(streaming_fraction=2 / 3, per_layer=True)
    assert per_layer.sum(1).tolist() == [2, 2, 2, 2]  # the same count in every layer, its lowest scores
    assert per_layer.tolist()[0] == [False, True, True] and per_layer.tolist()[3] == [True, True, False]
    ties = HeadPattern(torch.zeros(2, 3, dtype=torch.float64), SHAPE)  # ties: by position, deterministic
    assert ties.streaming_mask(streaming_fraction=0.5).flatten().tolist() == [True] * 3 + [False] * 3


def _write(tmp_path, name, content: bytes | str):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


GOOD = {"format": "lcx-head-pattern", "version": 1,
        "model": {"name": "toy-model", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64},
        "scores": [[0.1, 0.2], [0.3, 0.4]]}


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "no such file"),
    ("empty.json", "", "the file is empty"),
    ("latin1.json", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("truncated.json", json.dumps(GOOD)[:-20], "not valid JSON"),
    ("other.json", json.dumps({"format": "something-else"}), "not an lcx head pattern"),
    ("version.json", json.dumps({**GOOD, "version": 9}), "version 9 is not supported"),
    ("nan.json", json.dumps(GOOD).replace("0.4", "NaN"), "layer 1, KV head 1 is nan"),
    ("ragged.json", json.dumps({**GOOD, "scores": [[0.1, 0.2], [0.3]]}), "rows have different lengths"),
    ("shape.json", json.dumps({**GOOD, "scores": [[0.1, 0.2]]}), r"scores are \(1, 2\) but the model record says 2 layers"),
    ("string.json", json.dumps({**GOOD, "scores": [["a", 0.2], [0.3, 0.4]]}), "'a'; scores are finite numbers"),
    ("model.json", json.dumps({**GOOD, "model": {"num_layers": -1}}), r"model.num_layers=-1 must be a positive integer"),
    ("garbage.tsv", "0.1\t0.2\nhello world\n", "line 2 is not a row of numbers"),
    ("inf.tsv", "0.1\tinf\n0.2\t0.3\n", "layer 0, KV head 1 is inf"),
    ("ragged.tsv", "0.1\t0.2\n0.3\n", "rows have different lengths"),
])
def test_bad_files_give_one_clear_error(tmp_path, name, content, message):
    p = tmp_path / name if content is None else _write(tmp_path, name, content)
    with pytest.raises(LcxConfigError, match=message) as e:
        head_patterns.load(p)
    assert str(p) in str(e.value)


def test_a_huge_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(head_patterns, "MAX_BYTES", 100)
    p = _write(tmp_path, "big.json", json.dumps(GOOD) + " " * 200)
    with pytest.raises(LcxConfigError, match="a head pattern is at most 100 bytes"):
        head_patterns.load(p)


def test_the_shipped_pattern_fits_the_embedded_model():
    found = head_patterns.shipped("SmolLM2-135M-Instruct")
    assert found is not None
    pat = head_patterns.load(found)
    assert pat.check(ModelShape(30, 3, 64)) == [] and pat.source.get("method") == "ablate"
    assert head_patterns.shipped("HuggingFaceTB/SmolLM2-135M-Instruct") == found
    assert head_patterns.shipped("some-other-model") is None


def test_a_path_under_an_unknown_users_home_is_one_clear_error():
    with pytest.raises(LcxConfigError, match="head pattern file '~nosuchuser-lcx/p.json': its ~user is unknown"):
        head_patterns.load("~nosuchuser-lcx/p.json")
