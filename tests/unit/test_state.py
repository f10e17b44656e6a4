"""The homes for per-page and per-request state."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin.state import PageSummaries, RequestStates


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.integers(1, 20), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_page_summaries_match_the_keys_of_each_page_over_chunked_writes(steps, seed):
    """Written chunk by chunk, as a prefill then decode steps would, the summary of each page equals
    the min/max/mean of the keys stored in it; a page written again from slot 0 starts afresh."""
    g = torch.Generator().manual_seed(seed)
    bs, hkv, d, nb = 4, 2, 3, 32
    pages = PageSummaries(nb, hkv, d, bs)
    table = torch.randperm(nb, generator=g)
    stored: dict[int, list[torch.Tensor]] = {}
    pos = 0
    for n in steps:
        key = torch.randn(n, hkv, d, generator=g)
        p = torch.arange(pos, pos + n)
        slots = table[p // bs] * bs + p % bs
        pages.update(key, slots)
        for i in range(n):
            stored.setdefault(int(table[(pos + i) // bs]), []).append(key[i])
        pos += n
    for block, keys in stored.items():
        k = torch.stack(keys)
        assert torch.equal(pages.min[block], k.min(0).values)
        assert torch.equal(pages.max[block], k.max(0).values)
        assert torch.allclose(pages.mean(torch.tensor([block]))[0], k.mean(0), atol=1e-6)
        assert int(pages.count[block]) == len(keys)
    # Reuse: block of position 0 written again from its first slot (new request, same physical page).
    first = int(table[0])
    fresh = torch.full((1, hkv, d), 7.0)
    pages.update(fresh, torch.tensor([first * bs]))
    assert torch.equal(pages.min[first], fresh[0]) and int(pages.count[first]) == 1


def test_padding_slots_are_ignored():
    pages = PageSummaries(4, 1, 2, 4)
    pages.update(torch.ones(3, 1, 2), torch.tensor([-1, 5, -1]))
    assert int(pages.count.sum()) == 1 and int(pages.count[1]) == 1


def test_request_states_live_until_dropped():
    states = RequestStates()
    states.get("a", 0)["cache"] = 1
    states.get("a", 1)["cache"] = 2
    states.get("b", 0)["cache"] = 3
    assert states.live() == 2 and states.get("a", 1) == {"cache": 2}
    assert states.drop({"a", "zzz"}) == 1
    assert "a" not in states and states.get("a", 0) == {}  # a new request with that id starts empty
