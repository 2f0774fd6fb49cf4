"""One mergeable-statistics base (:mod:`ttreg.stats`): the search's, the held-out sweep's and the
attention-bias fit's statistics declare each sum, count and maximum with its reduction, and both
the in-process ``merge`` and the ``torch.distributed`` all-reduce follow that declaration."""
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ttreg
from ttreg.bias import BiasStats
from ttreg.calibration import HeldoutSums
from ttreg.neurons import SearchStats, accumulate
from ttreg.stats import MergeableStats, state
from ttreg.testing import mixed_images

from stats_worker import as_dict, stats_of_rank


def assert_merged_equals_whole(merged: MergeableStats, whole: MergeableStats) -> None:
    """Whole numbers (and float tensors of counts) bitwise; sums to float tolerance."""
    for name in whole.reductions():
        a, b = getattr(merged, name), getattr(whole, name)
        if not torch.is_tensor(b):
            assert type(a) is int and a == b, name
        elif torch.equal(b, b.round()):                     # counts: exact
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_every_statistic_declares_its_reductions():
    assert SearchStats.reductions() == {
        "scores": "sum", "images": "sum", "images_with_outliers": "sum", "layer_hits": "sum",
        "ratio_sum": "sum", "max_norm_sum": "sum", "median_norm_sum": "sum",
        "outlier_log_ratio_sum": "sum", "activation_bytes": "max", "memory_budget": "max"}
    assert BiasStats.reductions() == {"key_sum": "sum", "value_sum": "sum", "count": "sum", "images": "sum"}
    assert HeldoutSums.reductions() == {"images": "sum", "with_outliers": "sum", "ratio_sum": "sum",
                                        "max_norm_sum": "sum"}

    @dataclass
    class Undeclared(MergeableStats):
        total: torch.Tensor = state("sum")
        seen: int = 0
    with pytest.raises(TypeError, match="Undeclared.seen is not declared with ttreg.stats.state"):
        Undeclared.reductions()
    with pytest.raises(ValueError, match="reduce must be one of sum, max, got 'mean'"):
        state("mean")
    with pytest.raises(TypeError, match="cannot merge SearchStats with BiasStats"):
        SearchStats.zeros(2, 2, 3).merge(BiasStats.zeros(2, 1, 2, 2))


def test_search_halves_merge_to_the_whole(planted):
    ad = ttreg.wrap(planted)
    x = mixed_images(9)
    halves = []
    for part in (x[:4], x[4:]):
        s = SearchStats.zeros(6, 4, 384)
        accumulate(ad, part, s, 5, "auto", memory_budget=1 << 10)     # the two-pass path
        halves.append(s)
    whole = SearchStats.zeros(6, 4, 384)
    for part in (x[:4], x[4:]):
        accumulate(ad, part, whole, 5, "auto", memory_budget=1 << 10)
    merged = halves[0].merge(halves[1])
    assert (merged.images, merged.images_with_outliers) == (9, 9)
    assert_merged_equals_whole(merged, whole)
    # maxima, not sums: the largest batch's activation memory (5 images, 65 tokens, 4 layers
    # of 384 float32) and the budget
    assert merged.activation_bytes == halves[1].activation_bytes == 5 * 65 * 384 * 4 * 4
    assert merged.memory_budget == 1 << 10
    one = SearchStats.zeros(6, 4, 384)
    accumulate(ad, x, one, 5, "auto")
    torch.testing.assert_close(merged.scores, one.scores, rtol=1e-6, atol=1e-9)   # another batching
    assert torch.equal(merged.layer_hits, one.layer_hits)


def test_bias_and_heldout_halves_merge_to_the_whole():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 2, 3, 1, 4, generator=g), torch.randn(6, 2, 3, 1, 5, generator=g)
    whole, halves = BiasStats.zeros(2, 3, 4, 5), [BiasStats.zeros(2, 3, 4, 5) for _ in range(2)]
    for i in range(6):                                       # batches of one image, both layers
        for layer in range(2):
            whole.add(layer, keys[i, layer][None], values[i, layer][None])
            halves[i // 3].add(layer, keys[i, layer][None], values[i, layer][None])
    whole.images, halves[0].images, halves[1].images = 6, 3, 3
    merged = halves[0].merge(halves[1])
    assert merged.images == 6 and torch.equal(merged.count, torch.tensor([6.0, 6.0], dtype=torch.float64))
    assert_merged_equals_whole(merged, whole)
    torch.testing.assert_close(merged.mean()[0], keys[:, :, :, 0].mean(0).float())

    ratio, top = torch.rand(10, generator=g) * 5 + 1, torch.rand(10, generator=g) * 20
    out = ratio > 3
    whole, halves = HeldoutSums.zeros(2), [HeldoutSums.zeros(2) for _ in range(2)]
    for size in range(2):
        whole.add(size, ratio, out, top)
        halves[0].add(size, ratio[:7], out[:7], top[:7])
        halves[1].add(size, ratio[7:], out[7:], top[7:])
    merged = halves[0].merge(halves[1])
    assert merged.images.tolist() == [10.0, 10.0]
    assert merged.with_outliers.tolist() == [float(out.sum())] * 2
    assert_merged_equals_whole(merged, whole)


def test_two_gloo_ranks_reduce_as_merge_does(tmp_path):
    """The all-reduce over two ranks equals ``merge`` of the two ranks' statistics, bitwise
    (one addition per number either way), maxima included."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "reduced.pt"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("stats_worker.py")), str(out)],
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for p in procs:
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log[-3000:]
    reduced = torch.load(out)
    a, b = stats_of_rank(0), stats_of_rank(1)
    for name in a:
        merged = as_dict(a[name].merge(b[name]))
        assert reduced[name].keys() == merged.keys()
        for field, value in merged.items():
            got = reduced[name][field]
            if torch.is_tensor(value):
                assert torch.equal(got, value), (name, field)
            else:
                assert type(got) is int and got == value, (name, field)
    assert reduced["search"]["images"] == 9 and reduced["search"]["activation_bytes"] == 2000
    assert reduced["search"]["memory_budget"] == 8 and reduced["bias"]["images"] == 12
