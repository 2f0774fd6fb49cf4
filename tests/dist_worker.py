"""Run by test_distributed under torchrun: each rank reads its share of the images for the
search, the attention-bias fit, a whole calibration (with the bias) and the same calibration
through the command line; rank 0 writes the results into the folder given."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ttreg
from ttreg.cli import main
from ttreg.testing import mixed_images, planted_vit

dist.init_process_group("gloo")
torch.set_num_threads(1)
out, folder = Path(sys.argv[1]), sys.argv[2]
model = planted_vit()
rn = ttreg.find_register_neurons(model, mixed_images(11), top_k=5, batch_size=2)
rn.attention_bias = ttreg.fit_attention_bias(model, rn, mixed_images(11), batch_size=2)
cal = ttreg.calibrate(model, mixed_images(13, seed=1), heldout=0.4, batch_size=2,
                      attention_bias=True)
if dist.get_rank() == 0:
    rn.save(out / "search.json")
    cal.neurons.save(out / "calibrate.json")
    (out / "calibrate_report.json").write_text(json.dumps(cal.report))
# the command line joins the group already there; rank 0 writes
status = main(["calibrate", "--model", "planted", "--images", folder, "--out", str(out / "cli.json"),
               "--report", str(out / "cli_report.json"), "--heldout", "0.4", "--batch-size", "2",
               "--quiet"])
assert status == 0, status
dist.destroy_process_group()
