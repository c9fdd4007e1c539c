import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_f32, float32_bound, tiny_config, tiny_model
from einops import rearrange

from palm_rlhf import PaLM, lm_loss
from palm_rlhf.config import LoRAConfig
from palm_rlhf.losses.lm import IGNORE_INDEX
from palm_rlhf.model import palm as palm_module

CONFIGS = {
    "mqa": {},
    "gqa": {"kv_heads": 2},
    "mha": {"kv_heads": 4},
    "xpos": {"use_xpos": True},
    "qk_norm": {"qk_norm": True},
    # Cohere's options: per-head LayerNorm qk-norm, a feed-forward width that is no multiple
    # of dim, its own norm epsilon and a logit scale.
    "cohere": {"qk_layernorm": True, "ff_inner": 50, "norm_eps": 1e-3, "logit_scale": 0.5},
    # Cohere2's: a sliding-window layer with rotary beside a full one without, under GQA.
    "sliding": {
        "layer_types": ("sliding", "full"),
        "sliding_window": 5,
        "rotary_layers": (True, False),
        "kv_heads": 2,
    },
}


def rotate(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def reference_block(block, x, positions, config, index):
    """A slow, literal PaLM block: explicit per-head softmax attention, no SDPA, no folding."""
    h, k_heads, d = config.heads, config.kv_heads, config.dim_head
    normed = F.layer_norm(x, (config.dim,), block.norm.weight, eps=config.norm_eps)
    inner = config.ff_inner or config.dim * config.ff_mult
    sizes = (h * d, k_heads * d, k_heads * d, inner, inner)
    q, k, v, value, gate = (normed @ block.fused_proj.weight.T).split(sizes, dim=-1)
    q = rearrange(q, "b n (h d) -> b h n d", h=h)
    k = rearrange(k, "b n (k d) -> b k n d", k=k_heads).repeat_interleave(h // k_heads, dim=1)
    v = rearrange(v, "b n (k d) -> b k n d", k=k_heads).repeat_interleave(h // k_heads, dim=1)
    scale = 1 / math.sqrt(d)
    if config.qk_norm:
        q, k = F.normalize(q, dim=-1) * block.qk_scale, F.normalize(k, dim=-1)
        scale = 1.0
    if config.qk_layernorm:
        weight_q, weight_k = block.qk_norm_weight[:h, None], block.qk_norm_weight[h:, None]
        # k is already repeated to h heads: repeat its weights the same way.
        q = F.layer_norm(q, (d,), eps=config.norm_eps) * weight_q
        k = F.layer_norm(k, (d,), eps=config.norm_eps) * weight_k.repeat_interleave(h // k_heads, 0)
    inv_freq = config.rotary_base ** (-torch.arange(d // 2).double() / (d // 2))
    angles = (positions[:, None, :, None].double() * inv_freq).float()
    cos, sin = angles.cos(), angles.sin()
    if config.use_xpos:
        base = (torch.arange(d // 2) + 0.4 * d / 2) / (1.4 * d / 2)
        s = base ** (
            (positions[:, None, :, None] - config.max_seq_len // 2) / config.xpos_scale_base
        )
        q, k = rotate(q, cos * s, sin * s), rotate(k, cos / s, sin / s)
    elif not config.rotary_layers or config.rotary_layers[index]:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) * scale
    n = x.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if config.layer_types and config.layer_types[index] == "sliding":
        allowed &= torch.ones(n, n, dtype=torch.bool).triu(-(config.sliding_window - 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = rearrange(scores.softmax(-1) @ v, "b h n d -> b n (h d)")
    ff = F.silu(gate) * value
    return x + attn @ block.attn_out.weight.T + ff @ block.ff_out.weight.T


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_literal_reference(name):
    model = tiny_model(**CONFIGS[name])
    tokens = torch.randint(0, 40, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    x = model.token_emb(tokens)
    config = model.config
    for index, block in enumerate(model.blocks):
        x = reference_block(block, x, positions, config, index)
    normed = F.layer_norm(x, (config.dim,), model.norm.weight, eps=config.norm_eps)
    expected = config.logit_scale * normed @ model.token_emb.weight.T
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_architecture_is_palm():
    model = tiny_model()
    config = model.config
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    block = model.blocks[0]
    # q (h*d) + one shared k and v (d each) + SwiGLU value and gate, all from one projection.
    inner = config.dim * config.ff_mult
    assert block.fused_proj.weight.shape == (4 * 8 + 8 + 8 + 2 * inner, config.dim)
    assert block.norm.bias is None and model.norm.bias is None
    # Tied embeddings: the output projection is the input embedding, not a copy.
    hidden = torch.randn(1, 3, config.dim)
    torch.testing.assert_close(model.to_logits(hidden), hidden @ model.token_emb.weight.T)
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()


@pytest.mark.parametrize("name", CONFIGS)
def test_causal(name):
    model = tiny_model(**CONFIGS[name])
    tokens = torch.randint(0, 40, (1, 10))
    changed = tokens.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 40
    torch.testing.assert_close(model(tokens)[:, :6], model(changed)[:, :6], atol=0, rtol=0)
    assert not torch.allclose(model(tokens)[:, 6:], model(changed)[:, 6:])


def test_bidirectional_sees_the_future():
    model = tiny_model(causal=False)
    tokens = torch.randint(0, 40, (1, 10))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 40
    assert not torch.allclose(model(tokens)[:, 0], model(changed)[:, 0])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", CONFIGS)
def test_padding_does_not_change_real_tokens(name, side):
    model = tiny_model(**CONFIGS[name])
    short, long = torch.randint(0, 39, (5,)), torch.randint(0, 39, (9,))
    pad = torch.full((4,), 39)
    row = torch.cat((pad, short)) if side == "left" else torch.cat((short, pad))
    mask = (torch.arange(9) >= 4) if side == "left" else (torch.arange(9) < 5)
    batch = torch.stack((row, long))
    batch_mask = torch.stack((mask, torch.ones(9, dtype=torch.bool)))
    logits = model(batch, mask=batch_mask)
    assert_close_f32(logits[0][mask], model(short[None])[0])
    assert_close_f32(logits[1], model(long[None])[0])
    assert torch.isfinite(logits).all()  # pad queries never see an all-masked row


def test_lm_loss_hand_computed():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    targets = torch.tensor([[0, IGNORE_INDEX]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert lm_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    log_z = math.log(math.exp(2) + 2)
    z = lm_loss(logits, targets, z_loss_weight=0.1).item()
    assert z == pytest.approx(expected + 0.1 * log_z**2, rel=1e-6)
    with pytest.raises(ValueError, match="no target tokens"):
        lm_loss(logits, torch.full((1, 2), IGNORE_INDEX))


def test_model_loss_masks_padding_and_prompt():
    model = tiny_model(z_loss_weight=0.0)
    tokens = torch.randint(0, 40, (2, 8))
    logits = model(tokens[:, :-1])
    full = F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
    assert model.loss(tokens).item() == pytest.approx(full.item(), rel=1e-5)
    # Only response tokens (positions 5..7) count.
    loss_mask = torch.zeros(2, 8, dtype=torch.bool)
    loss_mask[:, 5:] = True
    response_only = F.cross_entropy(logits[:, 4:].reshape(-1, 40), tokens[:, 5:].reshape(-1))
    assert model.loss(tokens, loss_mask=loss_mask).item() == pytest.approx(
        response_only.item(), rel=1e-5
    )


def test_z_loss_is_added():
    model = tiny_model(z_loss_weight=1e-2)
    tokens = torch.randint(0, 40, (2, 8))
    logits = model(tokens[:, :-1]).reshape(-1, 40)
    ce = F.cross_entropy(logits, tokens[:, 1:].reshape(-1))
    z = logits.logsumexp(-1).pow(2).mean()
    assert model.loss(tokens).item() == pytest.approx((ce + 1e-2 * z).item(), rel=1e-5)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    tokens = torch.randint(0, 40, (1, 8))
    torch.testing.assert_close(model(tokens), model(tokens), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.tensor([[0, 40]])), "token id 40 is outside the vocabulary"),
        (lambda m: m(torch.tensor([[-1, 3]])), "token id -1 is outside the vocabulary"),
        (lambda m: m(torch.zeros(1, 65, dtype=torch.long)), "exceeds max_seq_len 64"),
        (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), "shape"),
        (lambda m: m(torch.zeros(4, dtype=torch.long)), "shape"),
        (lambda m: m(torch.zeros(1, 3)), "integer tensor"),
        (lambda m: m(torch.zeros(1, 3, dtype=torch.long), mask=torch.ones(1, 4)), "mask shape"),
        (lambda m: m(torch.zeros(1, 3, dtype=torch.long), lora_scope="actor"), "unknown LoRA"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model())


def test_gradients_reach_every_parameter():
    model = tiny_model(qk_norm=True).train()
    model.loss(torch.randint(0, 40, (2, 10))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_init_is_small_and_seeded():
    torch.manual_seed(3)
    a = PaLM(tiny_config())
    torch.manual_seed(3)
    b = PaLM(tiny_config())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # Near-uniform predictions at init: loss close to log(vocab).
    loss = a.loss(torch.randint(0, 40, (4, 32))).item()
    assert abs(loss - math.log(40)) < 0.1


def test_the_float32_bound_scales_with_the_values_and_still_catches_bugs():
    """conftest's tolerance: 64 roundings of the largest value compared, at least of 1."""
    eps = torch.finfo(torch.float32).eps
    assert float32_bound(torch.tensor([0.001])) == 64 * eps
    assert float32_bound(torch.tensor([-40.0, 2.0])) == 64 * eps * 40
    logits = torch.randn(4, 8) * 5
    assert_close_f32(logits + 10 * eps * logits.abs(), logits)  # a few roundings pass
    with pytest.raises(AssertionError):
        assert_close_f32(logits + 1e-3, logits)  # a real difference does not


@pytest.mark.parametrize("name", ["mqa", "cohere"])
def test_token_statistics_equal_the_full_logits_path(name):
    """forward(..., targets=) (chunked, no (b, n, v) logits) against the logits path: log-probs,
    entropy and log Z at a temperature, in value and in gradient, with padding and the Cohere
    logit scale; and the model's loss (z-loss included) against lm_loss on full logits."""
    from palm_rlhf.losses.lm import lm_loss, shift_targets
    from palm_rlhf.losses.logprobs import entropy_from_logits, logprobs_from_logits

    model = tiny_model(**CONFIGS[name], z_loss_weight=1e-2).train()
    tokens = torch.randint(0, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row
    targets = tokens[:, 5:]  # the next tokens of the last 4 positions of tokens[:, :-1]

    def full_path():
        logits = model(tokens[:, :-1], mask=mask[:, :-1])[:, -4:]
        return (
            logprobs_from_logits(logits, targets, 0.7),
            entropy_from_logits(logits, 0.7),
            (logits.float() / 0.7).logsumexp(-1),
        )

    def chunked_path():
        stats = model(
            tokens[:, :-1], mask=mask[:, :-1], targets=targets, temperature=0.7, entropy=True
        )
        return stats.logprobs, stats.entropy, stats.log_z

    results = []
    for path in (full_path, chunked_path):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks on both paths
        values = path()
        (values[0].sum() + 0.5 * values[1].sum() + 0.1 * values[2].pow(2).sum()).backward()
        results.append((values, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (ours, our_grads) = results
    for a, b in zip(ours, full, strict=True):
        assert_close_f32(a, b)
    for a, b in zip(our_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

    inputs, input_mask, shifted = shift_targets(tokens, mask)
    torch.manual_seed(0)
    expected = lm_loss(model(inputs, mask=input_mask), shifted, z_loss_weight=1e-2)
    torch.manual_seed(0)
    assert model.loss(tokens, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_last_only_logits_are_the_last_row_of_the_full_logits():
    """What generate's prefill reads: one row per sequence instead of (b, n, v)."""
    model = tiny_model()
    tokens = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :4] = False
    last = model(tokens, mask=mask, last_only=True)
    assert last.shape == (2, 1, 40)
    assert_close_f32(last, model(tokens, mask=mask)[:, -1:])


@pytest.mark.parametrize("lora_scope", [None, "adapter"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(lora_scope):
    """Recomputing each block in backward must not change a number: the gradients of every
    trained tensor (base or adapter, with padding and sliding layers) equal those without it.
    Catches a checkpointed call that drops the mask, the LoRA scope or the rotary tables."""
    model = tiny_model(layer_types=("sliding", "full"), sliding_window=3)
    if lora_scope:
        model.add_lora(lora_scope, LoRAConfig(rank=4, alpha=8.0))
        with torch.no_grad():  # adapters start at zero: make them count
            for name, param in model.named_parameters():
                if "adapters" in name:
                    param.normal_(0, 0.1)
    tokens = torch.randint(0, model.config.num_tokens, (3, 9))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    targets = tokens[:, 1:]

    def run(enabled: bool):
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(enabled)
        stats = model(tokens[:, :-1], mask[:, :-1], lora_scope=lora_scope, targets=targets)
        loss = -(stats.logprobs * mask[:, 1:]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    calls = []
    original = palm_module.checkpoint
    palm_module.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        loss_on, grads_on = run(True)
    finally:
        palm_module.checkpoint = original
    loss_off, grads_off = run(False)
    assert len(calls) == model.config.depth  # every block went through the checkpoint
    assert_close_f32(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and grads_on
    if lora_scope:
        assert all("adapters" in n for n in grads_on)
    for name in grads_off:
        assert_close_f32(grads_on[name], grads_off[name])


def test_activation_checkpointing_is_skipped_without_gradients_and_with_a_cache():
    model = tiny_model().set_activation_checkpointing(True)
    tokens = torch.randint(0, model.config.num_tokens, (2, 5))
    calls = []
    original = palm_module.checkpoint
    palm_module.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad():
            plain = model(tokens)
        cache = model.new_cache(2)
        cached = model(tokens, cache=cache)
    finally:
        palm_module.checkpoint = original
    assert calls == []
    assert_close_f32(cached.detach(), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_equals_sdpa(dtype):
    """The CPU decoding kernel against scaled_dot_product_attention: grouped query heads,
    a padding mask with a whole row's keys but one masked, an explicit scale."""
    from palm_rlhf.model.layers import single_query_attention

    torch.manual_seed(0)
    q = torch.randn(3, 2, 4, 16, dtype=dtype)  # (b, kv heads, query heads per kv head, d)
    k, v = torch.randn(2, 3, 2, 9, 16, dtype=dtype).unbind(0)
    mask = torch.rand(3, 1, 1, 9) > 0.4
    mask[:, ..., -1] = True  # the current token is always a key
    mask[2, ..., :-1] = False
    for scale in (None, 0.3):
        got = single_query_attention(q, k, v, mask, scale)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        assert got.dtype == dtype
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(single_query_attention(q, k, v, None, None)[2], (
        F.scaled_dot_product_attention(q, k, v)[2]), **tol)  # fmt: skip
    # row 2 sees only its last key: its output is that key's value
    torch.testing.assert_close(got[2], v[2, :, -1:].expand(2, 4, 16), **tol)
