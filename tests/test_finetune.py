"""Fine-tuning with test-time registers installed (README, "Fine-tuning with registers"): training
steps in train mode, autocast, gradient checkpointing and LoRA; the gradients are those of the
edit written out by hand; a planted model's outliers stay cleared; the trained model's neuron set
is checked against its new fingerprint."""
from __future__ import annotations

import copy

import pytest
import torch

import ttreg
from ttreg.register_neurons import ModelMismatchError
from ttreg.testing import mixed_images, planted_vit

pytest.importorskip("timm")

RN = {1: [7], 3: [21]}


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def base():
    return planted_vit(depth=4, embed_dim=64, num_heads=2, img_size=32, plants=((1, 7, 12, 0.4), (3, 21, 12, 12.0)))


def ratio(model, x) -> torch.Tensor:
    """Largest over median patch norm at the last block, per image."""
    tr = ttreg.trace(model, x)
    p = tr.norms[:, -1, tr.patch_slice]
    return p.amax(-1) / p.median(-1).values


def restated_forward(model, x: torch.Tensor, neurons: dict[int, list[int]]) -> torch.Tensor:
    """The token form written out for a timm ViT: one zero register after the patches; in each
    block with register neurons, the MLP hidden state of each neuron is set to its maximum over
    the image's tokens on the register and to 0 elsewhere; the register is dropped at the end."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[-1])], dim=1)
    for i, blk in enumerate(model.blocks):
        h = h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))
        m = blk.mlp.norm(blk.mlp.drop1(blk.mlp.act(blk.mlp.fc1(blk.norm2(h)))))
        if i in neurons:
            idx = torch.tensor(neurons[i])
            v = m[:, :, idx]                                               # (B, T, K)
            moved = torch.cat([torch.zeros_like(v[:, :-1]), v.amax(dim=1, keepdim=True)], dim=1)
            m = m.index_copy(-1, idx, moved)
        h = h + blk.drop_path2(blk.ls2(blk.mlp.drop2(blk.mlp.fc2(m))))
    return model.norm(h)[:, :-1]


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_with_registers_equal_the_edit_written_out(base):
    model = copy.deepcopy(base).train()
    x = mixed_images(3, size=32, seed=1)
    with ttreg.test_time_registers(model, RN):
        out = model.forward_features(x)
        out.pow(2).mean().backward()
    got = grads_of(model)
    model.zero_grad()
    want_out = restated_forward(model, x, RN)
    want_out.pow(2).mean().backward()
    want = grads_of(model)
    assert torch.equal(out, want_out)
    assert got.keys() == want.keys() and len(got) > 40
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad()
    model.forward_features(x).pow(2).mean().backward()             # without registers they differ
    assert not torch.allclose(model.blocks[1].mlp.fc1.weight.grad, got["blocks.1.mlp.fc1.weight"])


def train(model, x, steps: int, *, lr: float = 1e-3, autocast=None, checkpointing: bool = False, registers=RN,
          check: bool = True):
    """A few SGD steps with registers installed (a handle, as a training script holds it)."""
    model.train()
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.randn(x.shape[0], model.embed_dim, generator=torch.Generator().manual_seed(0))
    handle = ttreg.add_test_time_registers(model, registers, check=check)
    losses = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                feats = model.forward_features(x)
                loss = (model.forward_head(feats, pre_logits=True).float() - target).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        handle.remove()
        model.set_grad_checkpointing(False)
    return model.eval(), losses


def test_checkpointed_training_steps_equal_plain_ones(base):
    x = mixed_images(4, size=32, seed=2)
    plain, la = train(copy.deepcopy(base), x, 3, check=False)
    ckpt, lb = train(copy.deepcopy(base), x, 3, checkpointing=True, check=False)
    assert la == lb and la[-1] < la[0]
    sa, sb = plain.state_dict(), ckpt.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_keeps_the_outliers_cleared(base, dtype):
    x = mixed_images(4, size=32, seed=3)
    model = copy.deepcopy(base)
    seen = []
    h = model.blocks[-1].mlp.fc2.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), ttreg.test_time_registers(model, RN):
        low = model.forward_features(x)
    h.remove()
    with torch.no_grad(), ttreg.test_time_registers(model, RN):
        full = model.forward_features(x)
    assert seen == [dtype] and low.shape == full.shape              # the matmuls ran in low precision
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(1), full.flatten(1))
    assert cos.min() > 0.99
    model, losses = train(model, x, 3, autocast=dtype, check=False)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert ratio(base, x).min() > 5                                 # the planted outlier is there ...
    with ttreg.test_time_registers(model, RN, check=False):
        assert ratio(model, x).max() < 2                            # ... and stays cleared after training


def test_lora_training_with_registers(base, tmp_path):
    peft = pytest.importorskip("peft")
    x = mixed_images(4, size=32, seed=4)
    found = ttreg.find_register_neurons(base, x, top_k=2)
    assert sorted(found.neurons) == [(1, 7), (3, 21)]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(base), cfg)
    ad = ttreg.wrap(lora)
    assert type(ad).__name__ == "PeftAdapter" and ad.down_proj(3) is lora.base_model.model.blocks[3].mlp.fc2
    with pytest.raises(ModelMismatchError, match="check=False"):    # LoRA weights: another fingerprint
        ttreg.add_test_time_registers(lora, found)
    # gradients reach the LoRA weights only, through the edited neuron sites
    with ttreg.test_time_registers(lora, found, check=False):
        lora.train()
        lora.base_model.model.forward_features(x).pow(2).mean().backward()
    trained = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert any("blocks.3.mlp.fc2.lora_A" in n for n in trained)
    lora.zero_grad()
    vit = lora.base_model.model
    vit.set_grad_checkpointing(False)
    _, losses = _train_lora(lora, x, found)
    assert losses[-1] < losses[0]
    merged = lora.merge_and_unload().eval()
    with ttreg.test_time_registers(merged, found, check=False):
        assert ratio(merged, x).max() < 2                           # cleared after LoRA training
    # save and reload: the trained weights have a new fingerprint; the set's neurons still hold
    torch.save(merged.state_dict(), tmp_path / "tuned.pt")
    found.save(tmp_path / "neurons.json")
    again = copy.deepcopy(base)
    again.load_state_dict(torch.load(tmp_path / "tuned.pt"))
    with pytest.raises(ModelMismatchError, match="other weights") as e:
        ttreg.add_test_time_registers(again, ttreg.RegisterNeurons.load(tmp_path / "neurons.json"))
    assert "calibrate on this model or pass check=False" in str(e.value)
    refound = ttreg.find_register_neurons(again, x, top_k=2)         # what the README says to do
    assert sorted(refound.neurons) == sorted(found.neurons)
    refound.save(tmp_path / "tuned-neurons.json")
    with ttreg.test_time_registers(again, ttreg.RegisterNeurons.load(tmp_path / "tuned-neurons.json")):
        assert ratio(again, x).max() < 2


def _train_lora(lora, x, neurons, steps: int = 4):
    vit = lora.base_model.model
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    losses = []
    with ttreg.test_time_registers(lora, neurons, check=False):
        for _ in range(steps):
            opt.zero_grad()
            loss = vit.forward_features(x)[:, 1:].pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return lora.eval(), losses
