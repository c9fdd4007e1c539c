import pytest
import torch
from conftest import assert_close_f32, tiny_model
from test_palm import CONFIGS

from palm_rlhf import generate


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_logits_equal_full_forward_at_every_step(name):
    model = tiny_model(**CONFIGS[name])
    tokens = torch.randint(0, 40, (3, 24))
    cache = model.new_cache(3)
    with torch.no_grad():
        prefill = model(tokens[:, :7], cache=cache)
        assert_close_f32(prefill, model(tokens[:, :7]))
        for step in range(7, 24):
            cached = model(tokens[:, step : step + 1], cache=cache)[:, -1]
            full = model(tokens[:, : step + 1])[:, -1]
            assert_close_f32(cached, full)


def test_chunked_prefill_equals_full_forward():
    model = tiny_model(kv_heads=2)
    tokens = torch.randint(0, 40, (2, 20))
    cache = model.new_cache(2)
    with torch.no_grad():
        chunks = [model(tokens[:, i : i + 5], cache=cache) for i in range(0, 20, 5)]
        assert_close_f32(torch.cat(chunks, 1), model(tokens))


@pytest.mark.parametrize("name", ["mqa", "sliding"])
def test_left_padded_cached_decoding_equals_full_forward(name):
    # "sliding": the window (5) is passed while decoding, with 4 padding slots in row 0.
    model = tiny_model(**CONFIGS[name])
    tokens = torch.randint(0, 39, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    tokens[0, :4], mask[0, :4] = 39, False
    cache = model.new_cache(2)
    with torch.no_grad():
        model(tokens[:, :6], mask=mask[:, :6], cache=cache)
        for step in range(6, 12):
            cached = model(tokens[:, step : step + 1], cache=cache)[:, -1]
            full = model(tokens[:, : step + 1], mask=mask[:, : step + 1])[:, -1]
            assert_close_f32(cached, full)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cache_stores_only_key_value_heads(kv_heads):
    model = tiny_model(kv_heads=kv_heads)
    cache = model.new_cache(batch_size=3, max_len=16)
    config = model.config
    assert cache.keys.shape == (config.depth, 3, kv_heads, 16, config.dim_head)
    assert cache.values.shape == cache.keys.shape


def test_cache_overflow_and_batch_mismatch_raise():
    model = tiny_model()
    cache = model.new_cache(batch_size=1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache overflow"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds 1 rows"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(batch_size=1, max_len=65)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_with_and_without_cache_is_identical(name):
    model = tiny_model(**CONFIGS[name])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    kwargs = dict(max_new_tokens=20, temperature=0.0, pad_id=39)
    cached = generate(model, prompts, **kwargs)
    uncached = generate(model, prompts, use_cache=False, **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert_close_f32(cached.logprobs, uncached.logprobs)
