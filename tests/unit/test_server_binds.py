"""``server.spread_binds``: servers started together get disjoint CPU slices (vLLM's "auto" would
bind every one of them to the same CPUs)."""
from lcx_plugin.harness.server import spread_binds


def test_two_cores_alternate_between_four_servers():
    assert spread_binds(4, [0, 1]) == ["0", "1", "0", "1"]


def test_many_cores_are_sliced_without_overlap():
    binds = spread_binds(3, list(range(16)))
    sets = [set(map(int, b.split(","))) for b in binds]
    assert all(len(s) == 5 for s in sets) and not (sets[0] & sets[1] or sets[1] & sets[2] or sets[0] & sets[2])


def test_one_cpu_is_shared_and_the_list_follows_this_process_affinity():
    assert spread_binds(3, [5]) == ["5", "5", "5"]
    assert len(spread_binds(2)) == 2
