"""Run by test_distributed under torchrun: each rank searches its shard; rank 0 writes the result."""
import json
import sys

import torch
import torch.distributed as dist

import ttreg
from ttreg.testing import mixed_images, planted_vit

dist.init_process_group("gloo")
torch.set_num_threads(1)
rn = ttreg.find_register_neurons(planted_vit(), mixed_images(11), top_k=5, batch_size=2)
if dist.get_rank() == 0:
    json.dump(rn.to_dict(), open(sys.argv[1], "w"))
dist.destroy_process_group()
