"""The fused LoRA forward (trainer/fusedlora.py) computes what peft computes: loss and every gradient, in every
family, with and without dropout; it gives way to peft wherever it would not be the same, and is undone cleanly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trainer.fusedlora import fuse_lora_layers
from trainer.loss import causal_lm_loss_sum
from trainer.targets import target_modules_for

from .archhelpers import FAMILIES, build_family_model
from .test_loss import family_batch
from .trainhelpers import run_trainer, write_run

# Per decoder block: q/k/v and gate/up share an input; fused layers (Phi-3 qkv_proj, GPT-2, NeoX) have no siblings.
SHARED_GROUPS_PER_BLOCK = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gemma2": 2, "gemma3_text": 2,
                           "phi3": 0, "gpt2": 0, "gpt_neox": 0}


def lora_of(model, dropout=0.0, targets="all-linear"):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=target_modules_for(model, targets),
                        task_type="CAUSAL_LM", init_lora_weights=False)  # non-zero B: every gradient is non-trivial
    return get_peft_model(model, config)


def loss_and_grads(model, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both ways
    loss = causal_lm_loss_sum(model, batch, "auto")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(first, second):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_trains_the_same_numbers_fused(tokenizer, model_type):
    model = lora_of(build_family_model(model_type, tokenizer))
    model.train()
    for module in model.modules():  # GPT-2 and NeoX have dropout of their own: off, so both passes are one model
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = family_batch()
    expected = loss_and_grads(model, batch)
    fused = fuse_lora_layers(model)
    blocks = model.get_base_model().config.num_hidden_layers
    assert len(fused.groups) == SHARED_GROUPS_PER_BLOCK[model_type] * blocks
    assert fused.layers or model_type == "gpt2"  # GPT-2's layers are Conv1D: peft's own forward for them
    assert_same(expected, loss_and_grads(model, batch))
    assert all(group.sharing and group.shared_calls > 0 for group in fused.groups)
    assert_same(expected, loss_and_grads(model, batch))  # a second step: nothing left over from the first
    fused.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_with_dropout_each_layer_keeps_its_own_mask_and_the_numbers(tokenizer):
    model = lora_of(build_family_model("llama", tokenizer), dropout=0.3)
    model.train()
    batch = family_batch()
    expected = loss_and_grads(model, batch, seed=5)
    fused = fuse_lora_layers(model)
    assert fused.layers and not fused.groups
    assert "dropout is on" in fused.describe()
    assert_same(expected, loss_and_grads(model, batch, seed=5))
    other_masks = loss_and_grads(model, batch, seed=6)[0]
    assert abs(float(other_masks) - float(expected[0])) > 1e-4  # the masks matter: the equality above is real


def test_an_optimiser_step_between_forwards_is_seen(tokenizer):
    model = lora_of(build_family_model("llama", tokenizer))
    batch = family_batch()
    fused = fuse_lora_layers(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss_and_grads(model, batch)
    optimizer.step()
    after_step = loss_and_grads(model, batch)
    fused.undo()
    assert_same(loss_and_grads(model, batch), after_step)


def test_disabled_merged_or_several_adapters_run_peft_s_own_forward(tokenizer):
    model = lora_of(build_family_model("llama", tokenizer))
    model.eval()
    batch = family_batch()
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"]).logits
        fused = fuse_lora_layers(model)
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, adapted, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            base = model(input_ids=batch["input_ids"]).logits
        assert (base - adapted).abs().max() > 1e-3
        fused.undo()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, base)
        fused = fuse_lora_layers(model)
        model.merge_adapter()  # the base weights now hold the adapter: the fused forward must not add it again
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, adapted, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        fused.undo()


def test_siblings_fed_different_inputs_get_their_own_products(tokenizer):
    model = lora_of(build_family_model("llama", tokenizer), targets="q-k-v-o")
    fused = fuse_lora_layers(model)
    attention = model.get_base_model().model.layers[0].self_attn
    group = next(g for g in fused.groups if attention.q_proj.lora_A["default"] in g.layers)
    torch.manual_seed(1)
    inputs = [torch.randn(3, 64) for _ in range(15)]  # more calls than the group waits for
    with torch.no_grad():
        for i, x in enumerate(inputs):  # q, k and v each on its own tensor: nothing can be shared
            layer = (attention.q_proj, attention.k_proj, attention.v_proj)[i % 3]
            expected = x @ layer.weight.t() + (x @ layer.lora_A["default"].weight.t()) \
                @ layer.lora_B["default"].weight.t() * layer.scaling["default"]
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert group.shared_calls == 0 and not group.sharing  # it gave up sharing and runs each product alone
    fused.undo()


def test_the_trainer_runs_the_fused_layers(home):
    run_dir = write_run(home, "fused", max_steps=2)  # the defaults: every linear layer, no dropout
    done = run_trainer(run_dir)
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "LoRA layers add their product into the base layer's output" in said
    assert "share one LoRA-A product in 4 groups of siblings" in said  # tiny-llama: 2 blocks x (q/k/v, gate/up)
