"""Calibration statistics are sums and counts: two ranks under torchrun equal one process."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rn.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        str(Path(__file__).with_name("dist_worker.py")), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dist = ttreg.RegisterNeurons.load(out)
    model = planted_vit()
    single = ttreg.find_register_neurons(model, mixed_images(11), top_k=5, batch_size=2)
    assert dist.num_images == 11 and dist.num_images_with_outliers == 11
    assert dist.neurons == single.neurons
    torch.testing.assert_close(torch.tensor(dist.scores), torch.tensor(single.scores), rtol=1e-5, atol=1e-6)
    assert dist.statistics["fraction_with_outliers"] == single.statistics["fraction_with_outliers"]
    # the attention bias: sums and counts over both shards equal one process's mean
    bias = ttreg.fit_attention_bias(model, single, mixed_images(11), batch_size=2)
    assert dist.attention_bias.num_images == 11
    torch.testing.assert_close(dist.attention_bias.key, bias.key, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.attention_bias.value, bias.value, rtol=1e-5, atol=1e-6)
