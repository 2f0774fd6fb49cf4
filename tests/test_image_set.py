"""One image set (:class:`ttreg.data.ImageSet`): files or tensor batches normalised once, with a
length, subsets, one share per rank and batches; the search reads a folder and the same images
as a tensor to bitwise the same statistics."""
import pytest
import torch
from PIL import Image

import ttreg
from ttreg import distributed
from ttreg.data import (ImageError, ImageSet, default_transform, image_set, iter_batches,
                        list_image_files, load_image)
from ttreg.neurons import SearchStats, search_stats
from ttreg.testing import mixed_images


def numbered(n: int, start: int = 0) -> torch.Tensor:
    """``n`` constant 3x4x4 images whose pixels hold their number (start, start + 1, ...)."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 4, 4).clone()


def numbers(s: ImageSet) -> list[int]:
    return [int(v) for t in s.parts for v in t[:, 0, 0, 0]]


def write_pngs(folder, n: int) -> list:
    """``n`` 64 px 8-bit PNGs made from :func:`mixed_images`, named so that they sort in order."""
    x = ((mixed_images(n) * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    for i, img in enumerate(x):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return list_image_files(folder)


class FakeAdapter:
    """What :meth:`ImageSet.batches` asks of an adapter: where the batches go."""

    def parameter(self):
        return torch.zeros((), dtype=torch.float64)


def test_tensor_set_len_subset_and_batches_keep_parts_apart():
    s = image_set([numbered(4), numbered(5, 4)])
    assert len(s) == 9 and s.skipped == []
    sub = s.subset([5, 0, 1, 8, 2])
    assert numbers(sub) == [5, 0, 1, 8, 2]
    assert [len(t) for t in sub.parts] == [1, 2, 1, 1]          # runs within one part
    assert numbers(s[[3, 4]]) == [3, 4] and [len(t) for t in s[[3, 4]].parts] == [1, 1]
    # no batch spans two parts (as iter_batches over a list of tensors always did)
    batches = list(s.batches(FakeAdapter(), 3))
    assert [b.shape[0] for b in batches] == [3, 1, 3, 2]
    assert all(b.dtype == torch.float64 for b in batches)
    assert torch.equal(torch.cat(batches).float(), torch.cat([numbered(4), numbered(5, 4)]))
    assert [b.shape[0] for b in iter_batches([numbered(4), numbered(5, 4)], FakeAdapter(), 3)] == [3, 1, 3, 2]
    assert len(s.subset([])) == 0 and list(s.subset([]).batches(FakeAdapter(), 2)) == []
    with pytest.raises(IndexError, match="image 9 is out of range for a set of 9 images"):
        s.subset([9])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 11])
def test_shards_cover_every_image_exactly_once(tmp_path, world_size):
    tensors = image_set([numbered(4), numbered(3, 4)])
    folder = tmp_path / "f"
    folder.mkdir()
    write_pngs(folder, 5)
    files = image_set(folder)
    for s, ids in ((tensors, numbers), (files, lambda sh: sh.source.names)):
        shards = [s.shard(rank, world_size) for rank in range(world_size)]
        seen = [i for sh in shards for i in ids(sh)]
        assert sorted(seen) == sorted(ids(s)) and len(seen) == len(s)
        assert sum(len(sh) for sh in shards) == len(s)
        # every world-size-th image, from the rank
        assert [ids(sh) for sh in shards] == [ids(s)[r::world_size] for r in range(world_size)]
    assert tensors.shard(0, 1) is tensors


def test_distributed_shard_takes_the_rank_from_the_process_group(monkeypatch):
    x = numbered(7)
    monkeypatch.setattr(distributed, "world", lambda: (2, 3))
    assert numbers(distributed.shard(x)) == [2, 5]
    assert numbers(distributed.shard_for_rank([x[:3], x[3:]])) == [2, 5]
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    assert numbers(distributed.shard(x)) == list(range(7))


def test_image_set_normalises_once_and_refuses_in_one_line(tmp_path):
    one = image_set(numbered(1)[0])                            # one (C, H, W) image
    assert len(one) == 1 and one.parts[0].shape == (1, 3, 4, 4)
    assert image_set(one) is one
    with pytest.raises(ImageError, match=r"expected an image batch \(N, C, H, W\), got shape \(4, 4\)"):
        image_set(torch.zeros(4, 4))
    with pytest.raises(ImageError, match="no images given"):
        image_set(torch.zeros(0, 3, 4, 4))
    with pytest.raises(ImageError, match="no images given"):
        image_set([])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(image_set(numbered(2)).batches(FakeAdapter(), 0))
    folder = tmp_path / "f"
    folder.mkdir()
    write_pngs(folder, 2)
    (folder / "bad.png").write_bytes(b"not an image")
    s = image_set(folder)
    assert len(s) == 2 and [k.path for k in s.skipped] == [str(folder / "bad.png")]


def test_a_folder_and_the_same_images_as_a_tensor_give_bitwise_equal_statistics(planted, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    files = write_pngs(folder, 9)
    ad = ttreg.wrap(planted)
    tf = default_transform(ad)
    tensor = torch.stack([tf(load_image(p)) for p in files])
    kw = dict(batch_size=4, search_layers=4)
    a, b = search_stats(planted, folder, **kw), search_stats(planted, tensor, **kw)
    assert a.images == b.images == 9 and a.images_with_outliers == b.images_with_outliers == 9
    for name in SearchStats.reductions():
        va, vb = getattr(a, name), getattr(b, name)
        assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, name
    assert image_set(folder).input_size(ad) == image_set(tensor).input_size(ad) == (64, 64)
