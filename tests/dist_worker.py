"""Run by test_distributed under torchrun: each rank searches its shard, then fits the attention
bias on its shard; rank 0 writes the result (the neuron file with its bias beside it)."""
import sys

import torch
import torch.distributed as dist

import ttreg
from ttreg.testing import mixed_images, planted_vit

dist.init_process_group("gloo")
torch.set_num_threads(1)
model = planted_vit()
rn = ttreg.find_register_neurons(model, mixed_images(11), top_k=5, batch_size=2)
rn.attention_bias = ttreg.fit_attention_bias(model, rn, mixed_images(11), batch_size=2)
if dist.get_rank() == 0:
    rn.save(sys.argv[1])
dist.destroy_process_group()
