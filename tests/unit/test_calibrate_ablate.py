"""``lcx calibrate --mode ablate`` on a tiny random Llama: the partial forward it runs from a cached
layer input is the model's own forward, streaming one layer's heads changes the answer only when
the window cannot see the whole prompt, and a head that streams without effect scores zero."""
from __future__ import annotations

import pytest
import torch

from lcx_plugin.harness import calibrate
from lcx_plugin.harness.calibrate import STATE, _answer_nll, _decoder, score_ablate

LAYERS, KV_HEADS, TOKENS, START = 3, 2, 40, 34


class _Silent:
    def advance(self, n: int = 1, note: str = "") -> None:
        pass


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    config._attn_implementation = calibrate.register_attention()
    m = LlamaForCausalLM(config).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    return [(torch.randint(0, 97, (TOKENS,), generator=g).tolist(), START) for _ in range(2)]


def _full_nll(model, ids, start):
    logits = model(torch.tensor([ids])).logits[0, start - 1:len(ids) - 1].float()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[start:])[:, None])[:, 0]


@torch.no_grad()
@pytest.mark.parametrize("streams", [False, True])
def test_the_partial_forward_is_the_models_own(model, data, streams):
    inner = _decoder(model)
    ids, start = data[0]
    STATE.mode, STATE.sink, STATE.window = "off", 2, 4
    hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    dense = _full_nll(model, ids, start)
    try:
        for layer in range(LAYERS):
            if streams:
                STATE.mode, STATE.stream = "ablate", {layer: torch.tensor([True, False])}
            whole = _full_nll(model, ids, start)
            partial = _answer_nll(model, inner, hs[layer], layer, ids, start)
            torch.testing.assert_close(partial, whole, rtol=1e-5, atol=1e-5)
            assert streams == bool((whole - dense).abs().max() > 1e-4), "streaming a head must change the answer"
            STATE.mode = "off"
    finally:
        STATE.mode, STATE.stream = "off", None


@torch.no_grad()
def test_scores_are_layers_by_kv_heads_and_zero_when_the_window_sees_everything(model, data):
    seen = score_ablate(model, data, sink=2, window=4, progress=_Silent())
    assert seen.shape == (LAYERS, KV_HEADS) and torch.isfinite(seen).all() and seen.abs().max() > 1e-3
    blind = score_ablate(model, data, sink=0, window=TOKENS, progress=_Silent())
    assert blind.abs().max() < 1e-4
    assert STATE.mode == "off" and STATE.stream is None


def test_a_model_without_a_llama_decoder_is_one_clear_error():
    with pytest.raises(ValueError, match="Llama-style decoder"):
        _decoder(torch.nn.Linear(2, 2))
