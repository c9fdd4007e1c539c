import math

import pytest
import torch
from conftest import assert_close_f32, tiny_model

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig, generate
from palm_rlhf.generation import filter_logits, sampling_logprobs

PAD = 39


def test_issue_example_contract():
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = PaLM(
        PaLMConfig(num_tokens=tok.vocab_size, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=128)
    )
    out = generate(
        model,
        [tok.encode("def "), tok.encode("import os\n")],
        max_new_tokens=16,
        temperature=0.8,
        top_p=0.95,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        seed=0,
    )
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape
    assert out.tokens.shape[0] == 2 and 1 <= out.tokens.shape[1] <= 16
    assert out.mask.dtype == torch.bool
    assert (out.logprobs[out.mask] <= 0).all() and (out.logprobs[~out.mask] == 0).all()
    assert out.prompt_tokens.shape == (2, 10) and out.prompt_mask.sum().item() == 14


def test_padded_batch_equals_each_row_alone_greedy():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16]]
    batch = generate(model, prompts, max_new_tokens=15, temperature=0.0, pad_id=PAD)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=15, temperature=0.0, pad_id=PAD)
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        assert_close_f32(batch.logprobs[i], alone.logprobs[0])


def test_padded_batch_equals_each_row_alone_with_eos():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [20, 21]]
    probe = generate(model, prompts, max_new_tokens=12, temperature=0.0, pad_id=PAD)
    eos = int(probe.tokens[0, 4])  # row 0 will stop at step 4 (or earlier)
    batch = generate(model, prompts, max_new_tokens=12, temperature=0.0, pad_id=PAD, eos_id=eos)
    for i, prompt in enumerate(prompts):
        alone = generate(
            model, [prompt], max_new_tokens=12, temperature=0.0, pad_id=PAD, eos_id=eos
        )
        n = alone.mask[0].sum().item()
        assert torch.equal(batch.mask[i, :n], alone.mask[0, :n]) and not batch.mask[i, n:].any()
        assert torch.equal(batch.tokens[i, :n], alone.tokens[0, :n])
        assert_close_f32(batch.logprobs[i, :n], alone.logprobs[0, :n])


def test_eos_finishes_rows_and_pads_after():
    model = tiny_model()
    probe = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0.0)
    eos = int(probe.tokens[0, 3])
    first = int((probe.tokens[0] == eos).nonzero()[0])
    out = generate(
        model, [[1, 2, 3], [5, 6]], max_new_tokens=10, temperature=0.0, eos_id=eos, pad_id=PAD
    )
    assert out.tokens[0, first] == eos and out.mask[0, : first + 1].all()
    assert not out.mask[0, first + 1 :].any()
    assert (out.tokens[0, first + 1 :] == PAD).all() and (out.logprobs[0, first + 1 :] == 0).all()
    # Decoding stops as soon as every row has finished.
    single = generate(
        model, [[1, 2, 3]], max_new_tokens=10, temperature=0.0, eos_id=eos, pad_id=PAD
    )
    assert single.tokens.shape[1] == first + 1


def test_any_of_several_stop_ids_finishes_a_row():
    # A chat model ends a turn with its own token as well as eos: rows stop at either.
    model = tiny_model()
    prompts = [[1, 2, 3], [5, 6]]
    probe = generate(model, prompts, max_new_tokens=10, temperature=0.0, pad_id=PAD)
    stops = [int(probe.tokens[0, 4]), int(probe.tokens[1, 2])]
    ends = [
        int(torch.isin(row, torch.tensor(stops)).nonzero()[0]) for row in probe.tokens
    ]  # the first stop in each row, whichever it is
    out = generate(model, prompts, max_new_tokens=10, temperature=0.0, eos_id=stops, pad_id=PAD)
    for row, end in enumerate(ends):
        assert int(out.tokens[row, end]) in stops and out.mask[row, : end + 1].all()
        assert not out.mask[row, end + 1 :].any()
    assert out.tokens.shape[1] == max(ends) + 1
    with pytest.raises(ValueError, match="pad_id must differ"):
        generate(model, prompts, max_new_tokens=2, eos_id=[stops[0], PAD], pad_id=PAD)
    with pytest.raises(ValueError, match="eos_id=40 is outside"):
        generate(model, prompts, max_new_tokens=2, eos_id=[stops[0], 40], pad_id=PAD)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model()
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=10, pad_id=PAD)
    a = generate(model, [[1, 2], [3]], seed=7, **kwargs)
    b = generate(model, [[1, 2], [3]], seed=7, **kwargs)
    c = generate(model, [[1, 2], [3]], seed=8, **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_logprobs_are_those_of_the_sampling_distribution():
    model = tiny_model()
    out = generate(
        model, [[1, 2, 3]], max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9, seed=1
    )
    sequence = torch.cat((out.prompt_tokens, out.tokens), dim=1)
    logits = model(sequence)[:, 2:-1]  # logits that predicted each generated token
    expected = sampling_logprobs(logits, out.tokens, temperature=0.7, top_k=5, top_p=0.9)
    assert_close_f32(out.logprobs, expected)
    # With top_k=1 the sampling distribution is a point mass: log-prob exactly 0.
    point = generate(model, [[1, 2, 3]], max_new_tokens=5, top_k=1, seed=0)
    assert (point.logprobs == 0).all()


def test_generation_restores_training_mode_and_disables_dropout():
    model = tiny_model(dropout=0.5).train()
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.0)
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.0)
    assert torch.equal(a.tokens, b.tokens) and model.training


def test_filter_logits_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top_p = filter_logits(logits, top_p=0.7).softmax(-1)
    # 0.5 < 0.7, 0.5 + 0.25 >= 0.7: the nucleus is the first two tokens, renormalised.
    torch.testing.assert_close(top_p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    top_k = filter_logits(logits, top_k=3).softmax(-1)
    torch.testing.assert_close(top_k, torch.tensor([[0.5, 0.25, 0.15, 0.0]]) / 0.9)
    hot = filter_logits(logits, temperature=0.5).softmax(-1)
    squared = torch.tensor([[0.25, 0.0625, 0.0225, 0.01]])
    torch.testing.assert_close(hot, squared / squared.sum())
    lp = sampling_logprobs(logits, torch.tensor([1]), top_p=0.7)
    assert lp.item() == pytest.approx(math.log(1 / 3), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 40]]), "token id 40 outside the vocabulary"),
        (dict(prompts=[[1], [1, 2]]), "pass pad_id"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=62), "exceeds max_seq_len 64"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(eos_id=5, pad_id=5), "pad_id must differ from eos_id"),
        (dict(eos_id=5), "needs a pad_id"),
        (dict(pad_id=40), "pad_id=40 is outside"),
    ],
)
def test_bad_generation_input(kwargs, message):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), **args)


def test_packed_weight_decoding_equals_plain_decoding():
    from palm_rlhf.generation import can_pack_weights
    from palm_rlhf.model.lora import LoRALinear

    model = tiny_model()
    if not can_pack_weights(model):
        pytest.skip("this torch build has no MKL packed GEMM")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    kwargs = dict(max_new_tokens=12, temperature=0.0, pad_id=PAD)
    packed = generate(model, prompts, pack_weights=True, **kwargs)
    plain = generate(model, prompts, pack_weights=False, **kwargs)
    assert torch.equal(packed.tokens, plain.tokens)
    assert_close_f32(packed.logprobs, plain.logprobs)
    # The packed copies are released after the call, and training never sees them.
    assert all(m.packed is None for m in model.modules() if isinstance(m, LoRALinear))


def test_packed_decoding_with_a_lora_scope_equals_plain_decoding():
    from palm_rlhf.generation import can_pack_weights

    model = tiny_model()
    if not can_pack_weights(model):
        pytest.skip("this torch build has no MKL packed GEMM")
    with torch.no_grad():
        for param in model.add_lora("actor"):
            param.normal_(0, 0.3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    kwargs = dict(max_new_tokens=12, temperature=0.0, pad_id=PAD, lora_scope="actor")
    packed = generate(model, prompts, pack_weights=True, **kwargs)
    plain = generate(model, prompts, pack_weights=False, **kwargs)
    base = generate(model, prompts, max_new_tokens=12, temperature=0.0, pad_id=PAD)
    assert torch.equal(packed.tokens, plain.tokens) and not torch.equal(plain.tokens, base.tokens)
    assert_close_f32(packed.logprobs, plain.logprobs)


def test_repeated_prompts_are_prefilled_once_and_sample_as_if_each_row_were(monkeypatch):
    """Rows that repeat a prompt share one prefill (its cache rows and last logits copied):
    the sampled tokens and log-probs equal those of prefilling every row, and the prefill
    forward sees only the distinct prompts."""
    import palm_rlhf.generation as generation

    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 2, 3], [10], [4, 5, 6, 7, 8, 9], [1, 2, 3]]
    kwargs = dict(max_new_tokens=10, temperature=1.0, eos_id=5, pad_id=PAD, seed=3)
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    shared = generate(model, prompts, **kwargs)
    assert batch_sizes[0] == 3 and set(batch_sizes[1:]) == {len(prompts)}
    every_row = lambda tokens, mask: (torch.arange(tokens.shape[0]), torch.arange(tokens.shape[0]))
    monkeypatch.setattr(generation, "distinct_rows", every_row)
    batch_sizes.clear()
    separate = generate(model, prompts, **kwargs)
    hook.remove()
    assert batch_sizes[0] == len(prompts)
    assert torch.equal(shared.tokens, separate.tokens) and torch.equal(shared.mask, separate.mask)
    assert_close_f32(shared.logprobs, separate.logprobs)
    # the repeats drew their own samples: one prompt's three rows do not all agree
    assert not (
        torch.equal(shared.tokens[0], shared.tokens[2])
        and torch.equal(shared.tokens[0], shared.tokens[5])
    )


def test_categorical_sampling_matches_the_distribution():
    from palm_rlhf.generation import sample_categorical

    probs = torch.tensor([[0.0, 0.5, 0.25, 0.0, 0.15, 0.1]]).expand(40000, 6)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    # sampling noise, not rounding: 40,000 draws give a std of at most sqrt(0.25 / 40000) =
    # 0.0025 per frequency, so 0.01 is four standard deviations
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    assert freq[0] == 0 and freq[3] == 0  # zero-probability tokens are never drawn
    one_hot = torch.zeros(5, 6)
    one_hot[:, 5] = 1.0
    assert (sample_categorical(one_hot) == 5).all()
