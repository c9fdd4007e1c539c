"""ByteTokenizer and pad_sequences: lossless, distinct specials, exact padding layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_rlhf.tokenizers.base import ByteTokenizer, Tokenizer, pad_sequences

tok = ByteTokenizer()
PAD, BOS, EOS = tok.pad_id, tok.bos_id, tok.eos_id
T, F = True, False

# Deterministic (no example database randomness between runs) and quick.
fast = settings(derandomize=True, deadline=None, max_examples=200)


@fast
@given(st.text())
def test_decode_inverts_encode(text):
    assert tok.decode(tok.encode(text)) == text


@fast
@given(st.text(), st.booleans(), st.booleans())
def test_decode_inverts_encode_with_specials(text, add_bos, add_eos):
    ids = tok.encode(text, add_bos=add_bos, add_eos=add_eos)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert ids == [BOS] * add_bos + list(text.encode("utf-8")) + [EOS] * add_eos


def test_special_ids_distinct_and_after_bytes():
    specials = [PAD, BOS, EOS]
    assert len(set(specials)) == 3
    assert all(256 <= i < tok.vocab_size for i in specials)
    assert tok.vocab_size == 259
    assert isinstance(tok, Tokenizer)


def test_encode_gives_exact_utf8_bytes():
    # é = U+00E9 -> C3 A9; € = U+20AC -> E2 82 AC
    assert tok.encode("é€") == [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert tok.encode("é€") == [195, 169, 226, 130, 172]
    assert tok.encode("a", add_bos=True, add_eos=True) == [BOS, 97, EOS]
    assert tok.encode("") == []
    assert tok.encode("", add_bos=True, add_eos=True) == [BOS, EOS]


def test_encode_rejects_bytes():
    with pytest.raises(ValueError, match="expects a str, got bytes"):
        tok.encode(b"abc")


def test_decode_drops_special_ids():
    assert tok.decode([BOS, 104, PAD, 105, EOS, PAD]) == "hi"
    assert tok.decode(torch.tensor([PAD, PAD, BOS, 0xC3, 0xA9, EOS])) == "é"
    assert tok.decode([PAD, BOS, EOS]) == ""


def test_decode_replaces_broken_utf8():
    # A response cut in the middle of "é" decodes with a replacement character, not an error.
    assert tok.decode([104, 0xC3]) == "h\ufffd"


@pytest.mark.parametrize("bad", [259, 1000, -1])
def test_decode_out_of_range_names_id(bad):
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary"):
        tok.decode([104, bad])


def test_encode_batch_left_padding_exact():
    ids, mask = tok.encode_batch(["ab", "c"], padding_side="left", add_bos=True)
    assert ids.tolist() == [[BOS, 97, 98], [PAD, BOS, 99]]
    assert mask.tolist() == [[T, T, T], [F, T, T]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


def test_encode_batch_right_padding_exact():
    ids, mask = tok.encode_batch(["ab", "c"], padding_side="right", add_eos=True)
    assert ids.tolist() == [[97, 98, EOS], [99, EOS, PAD]]
    assert mask.tolist() == [[T, T, T], [T, T, F]]


def test_encode_batch_default_is_left():
    ids, mask = tok.encode_batch(["abc", ""])
    assert ids.tolist() == [[97, 98, 99], [PAD, PAD, PAD]]
    assert mask.tolist() == [[T, T, T], [F, F, F]]


def test_max_length_left_keeps_the_end():
    ids, mask = tok.encode_batch(["abcd", "x"], padding_side="left", max_length=2)
    assert ids.tolist() == [[99, 100], [PAD, 120]]
    assert mask.tolist() == [[T, T], [F, T]]


def test_max_length_right_keeps_the_start():
    ids, mask = tok.encode_batch(["abcd", "x"], padding_side="right", max_length=2)
    assert ids.tolist() == [[97, 98], [120, PAD]]
    assert mask.tolist() == [[T, T], [T, F]]


def test_max_length_left_keeps_eos_right_keeps_bos():
    left, _ = tok.encode_batch(["abc"], "left", add_bos=True, add_eos=True, max_length=2)
    right, _ = tok.encode_batch(["abc"], "right", add_bos=True, add_eos=True, max_length=2)
    assert left.tolist() == [[99, EOS]]
    assert right.tolist() == [[BOS, 97]]


def test_max_length_longer_than_rows_changes_nothing():
    ids, mask = tok.encode_batch(["ab", "c"], padding_side="left", max_length=10)
    assert ids.tolist() == [[97, 98], [PAD, 99]]
    assert mask.tolist() == [[T, T], [F, T]]


def test_max_length_must_be_positive():
    for side in ("left", "right"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match="max_length must be a positive int"):
                tok.encode_batch(["abc"], padding_side=side, max_length=bad)


@fast
@given(
    st.lists(st.text(max_size=8), min_size=1, max_size=4),
    st.sampled_from(["left", "right"]),
    st.booleans(),
    st.booleans(),
)
def test_encode_batch_masked_ids_equal_each_row_alone(texts, side, add_bos, add_eos):
    ids, mask = tok.encode_batch(texts, padding_side=side, add_bos=add_bos, add_eos=add_eos)
    lengths = [len(tok.encode(t, add_bos=add_bos, add_eos=add_eos)) for t in texts]
    assert ids.shape == mask.shape == (len(texts), max(lengths))
    for i, text in enumerate(texts):
        assert ids[i][mask[i]].tolist() == tok.encode(text, add_bos=add_bos, add_eos=add_eos)
        assert (ids[i][~mask[i]] == PAD).all()
        # The real tokens are one contiguous run at the chosen side.
        expected = [F] * (ids.shape[1] - lengths[i]) + [T] * lengths[i]
        assert mask[i].tolist() == (expected if side == "left" else expected[::-1])
        assert tok.decode(ids[i]) == text


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="empty batch"):
        tok.encode_batch([])
    with pytest.raises(ValueError, match="empty batch"):
        pad_sequences([], pad_id=0)


@pytest.mark.parametrize("side", ["middle", "LEFT", None])
def test_bad_padding_side_raises(side):
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        tok.encode_batch(["a"], padding_side=side)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        pad_sequences([[1]], pad_id=0, padding_side=side)


def test_pad_sequences_uses_given_pad_id():
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=-3, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, -3, -3]]
    assert mask.tolist() == [[T, T, T], [T, F, F]]
