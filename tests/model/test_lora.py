import pytest
import torch
from conftest import assert_close_f32, tiny_model

from palm_rlhf import LoRAConfig, PaLM, generate, lora_parameters, merge_lora, remove_lora
from palm_rlhf.model.lora import LoRAAdapter


def perturb(params, scale=0.1):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


def test_new_adapter_is_a_no_op_and_base_is_frozen():
    model = tiny_model()
    tokens = torch.randint(0, 40, (2, 9))
    before = model(tokens)
    params = model.add_lora("actor", LoRAConfig(rank=4, alpha=8))
    torch.testing.assert_close(model(tokens, lora_scope="actor"), before, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.actor." in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if n in trainable}
    # 2 layers x 3 projections x (down + up)
    assert len(params) == 2 * 3 * 2


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_adapter_product_and_gradients_equal_the_formula(base_dtype):
    """The adapter's fused product (addmm into the base output, `up` transposed for a fast
    gradient) against W x + (alpha/r) B A x and its gradients, computed in float64; a wrong
    transpose, a dropped scale or an add into the wrong tensor shows here."""
    from palm_rlhf.model.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(24, 40).to(base_dtype)
    layer.weight.requires_grad_(False)
    layer.adapters["actor"] = LoRAAdapter(24, 40, LoRAConfig(rank=4, alpha=8))
    adapter = layer.adapters["actor"]
    perturb([adapter.up], scale=0.5)  # up starts at zero, which would hide a wrong product
    x = torch.randn(3, 5, 24, dtype=base_dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 40)
    out = layer(x, "actor")
    assert out.dtype == base_dtype and out.shape == (3, 5, 40)
    out.backward(grad_out.to(base_dtype))

    x64 = x.detach().double().requires_grad_()
    down = adapter.down.detach().double().requires_grad_()
    up = adapter.up.detach().double().requires_grad_()
    expected = x64 @ layer.weight.double().T + 2.0 * (x64 @ down.T) @ up.T
    expected.backward(grad_out.double())
    tol = dict(atol=1e-5, rtol=1e-5) if base_dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    # the adapter's own gradients stay float32 and match to float32 rounding of its inputs
    assert adapter.up.grad.dtype == adapter.down.grad.dtype == torch.float32
    grad_tol = dict(atol=1e-4, rtol=1e-4) if base_dtype == torch.float32 else tol
    torch.testing.assert_close(adapter.up.grad.double(), up.grad, **grad_tol)
    torch.testing.assert_close(adapter.down.grad.double(), down.grad, **grad_tol)


def test_adapter_under_autocast_matches_float32():
    from palm_rlhf.model.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(24, 40)
    layer.adapters["actor"] = LoRAAdapter(24, 40, LoRAConfig(rank=4, alpha=8))
    perturb([layer.adapters["actor"].up], scale=0.5)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x, "actor")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), layer(x, "actor"), atol=0.05, rtol=0.02)


def test_training_moves_only_the_adapter_and_reference_stays_the_base():
    model = tiny_model().train()
    tokens = torch.randint(0, 40, (4, 12))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(tokens).detach()
    params = model.add_lora("actor")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model.loss(tokens, lora_scope="actor")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, value in base_state.items():
        assert torch.equal(model.state_dict()[name], value), name
    # With adapters off the model is exactly the base: the PPO reference needs no copy.
    torch.testing.assert_close(model(tokens), reference, atol=0, rtol=0)
    assert not torch.allclose(model(tokens, lora_scope="actor"), reference)


def test_scopes_are_independent():
    model = tiny_model()
    tokens = torch.randint(0, 40, (2, 9))
    actor = model.add_lora("actor")
    critic = model.add_lora("critic", LoRAConfig(rank=2, targets=("fused_proj",)))
    perturb(actor)
    with_actor = model(tokens, lora_scope="actor")
    perturb(critic)
    torch.testing.assert_close(model(tokens, lora_scope="actor"), with_actor, atol=0, rtol=0)
    assert not torch.allclose(model(tokens, lora_scope="critic"), with_actor)
    assert {id(p) for p in actor}.isdisjoint(id(p) for p in critic)
    assert len(critic) == 2 * 1 * 2


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_merge_equals_unmerged_adapter(kv_heads):
    model = tiny_model(kv_heads=kv_heads)
    tokens = torch.randint(0, 40, (2, 9))
    perturb(model.add_lora("actor", LoRAConfig(rank=4, alpha=4)))
    unmerged = model(tokens, lora_scope="actor")
    merge_lora(model, "actor")
    assert_close_f32(model(tokens), unmerged)
    assert "actor" not in model.lora_configs
    with pytest.raises(ValueError, match="unknown LoRA scope 'actor'"):
        model(tokens, lora_scope="actor")


def test_generation_with_a_scope_uses_the_adapter():
    model = tiny_model()
    perturb(model.add_lora("actor"), scale=1.0)
    adapted = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0.0, lora_scope="actor")
    merge_lora(model, "actor")
    merged = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0.0)
    assert torch.equal(adapted.tokens, merged.tokens)


def test_adapters_round_trip_through_checkpoints(tmp_path):
    model = tiny_model()
    perturb(model.add_lora("actor", LoRAConfig(rank=3, alpha=6, targets=("attn_out",))))
    tokens = torch.randint(0, 40, (2, 9))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PaLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.lora_configs == model.lora_configs
    torch.testing.assert_close(
        loaded(tokens, lora_scope="actor"), model(tokens, lora_scope="actor"), atol=0, rtol=0
    )


def test_lora_errors():
    model = tiny_model()
    model.add_lora("actor")
    with pytest.raises(ValueError, match="already exists"):
        model.add_lora("actor")
    with pytest.raises(ValueError, match="identifier"):
        model.add_lora("not a name")
    with pytest.raises(ValueError, match="unknown projections"):
        LoRAConfig(targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA scope 'critic'"):
        lora_parameters(model, "critic")
    remove_lora(model, "actor")
    assert not any(".adapters." in n for n, _ in model.named_parameters())
