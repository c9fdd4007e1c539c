"""Preference data: each JSONL format, ties, malformed records (errors name file:line and
field), exact encoding with left truncation of the prompt, and a prompt-disjoint split."""

import json
import re
from pathlib import Path

import pytest
import torch

from palm_rlhf import ByteTokenizer
from palm_rlhf.data.preferences import (
    PreferenceGroup,
    RatedExample,
    encode_completion,
    encode_groups,
    encode_ratings,
    load_preferences,
    split_groups,
)

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def write_jsonl(path: Path, *records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_each_format_parses(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "id": 7},
        {"prompt": "p2", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "p3", "response": "r", "rating": 4},
        {"prompt": "p4", "response": "s", "rating": 2.5},
    )
    data = load_preferences(path)
    assert data.groups == [
        PreferenceGroup("p1", ["good", "bad"], [0, 1]),
        PreferenceGroup("p2", ["a", "b", "c"], [1, 2, 0]),
    ]
    assert data.ratings == [RatedExample("p3", "r", 4), RatedExample("p4", "s", 2.5)]


def test_ties_parse(tmp_path):
    path = write_jsonl(
        tmp_path / "ties.jsonl",
        {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [[0, 2], 1, [3]]},
    )
    assert load_preferences(path).groups[0].ranks == [0, 1, 0, 2]


def test_records_without_an_ordering_are_skipped_and_counted(tmp_path):
    # A labeler may tie everything or find nothing acceptable: valid records that train
    # nothing. They are counted, not errors.
    path = write_jsonl(
        tmp_path / "none.jsonl",
        {"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]},
        {"prompt": "p", "responses": ["a", "b"], "ranking": [], "not_rankable": True},
        {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]},
    )
    data = load_preferences(path)
    assert [g.ranks for g in data.groups] == [[1, 0]]
    assert data.skipped == {"all_tied": 1, "not_rankable": 1}


RANKING = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ('{"prompt": "p", "chosen": "a"', None, "not valid JSON"),
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "must be a string"),
        ({"prompt": "p", "response": "r", "rating": "5"}, "rating", "finite number"),
        ({"prompt": "p", "response": "r", "rating": True}, "rating", "finite number"),
        ({**RANKING, "ranking": [0, 1]}, "ranking", "missing \\[2\\]"),
        ({**RANKING, "ranking": [0, 1, 1, 2]}, "ranking", "index 1 appears more than once"),
        ({**RANKING, "ranking": [0, 1, 3]}, "ranking", "out of range"),
        ({**RANKING, "ranking": [0, [], 1, 2]}, "ranking", "empty tie list"),
        ({**RANKING, "ranking": [0, 1.0, 2]}, "ranking", "expected a response index"),
        ({**RANKING, "ranking": "0 1 2"}, "ranking", "non-empty list"),
        ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "K >= 2"),
        ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "responses", "strings"),
        ({"prompt": "p", "responses": ["a", "b"]}, "ranking", "missing"),
        ({"prompt": "p", "text": "t"}, None, "matches none of the formats"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "rating": 1}, None, "mixes the keys"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, record, field, problem):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", good, "", record)  # line 2 is blank
    with pytest.raises(ValueError) as info:
        load_preferences(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    if field is not None:
        assert f"'{field}'" in message
    assert re.search(problem, message), message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no preference records")):
        load_preferences(path)


def test_encode_groups_exact():
    groups = [
        PreferenceGroup("ab", ["c", "de"], [0, 1]),
        PreferenceGroup("x", ["y", "z", "w"], [1, 0, 1]),
    ]
    batch = encode_groups(groups, TOK, max_seq_len=16)
    a, b, c, d, e = (ord(ch) for ch in "abcde")
    x, y, z, w = (ord(ch) for ch in "xyzw")
    expected = [
        [BOS, a, b, c, EOS, PAD],
        [BOS, a, b, d, e, EOS],
        [BOS, x, y, EOS, PAD, PAD],
        [BOS, x, z, EOS, PAD, PAD],
        [BOS, x, w, EOS, PAD, PAD],
    ]
    assert batch["tokens"].tolist() == expected
    assert batch["mask"].tolist() == [[t != PAD for t in row] for row in expected]
    assert batch["ranks"].tolist() == [0, 1, 1, 0, 1]
    assert batch["group"].tolist() == [0, 0, 1, 1, 1]
    assert batch["tokens"].dtype == torch.long and batch["mask"].dtype == torch.bool


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response_end():
    prompt, response = TOK.encode("abcd"), TOK.encode("xy")
    assert encode_completion(TOK, prompt, response, 6) == [BOS, *TOK.encode("cd"), *response, EOS]
    assert encode_completion(TOK, prompt, response, 4) == [BOS, *response, EOS]
    # The response alone is too long: its end and eos survive, its start goes.
    assert encode_completion(TOK, prompt, TOK.encode("wxyz"), 4) == [BOS, *TOK.encode("yz"), EOS]
    assert encode_completion(TOK, prompt, response, 100) == [BOS, *prompt, *response, EOS]
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_completion(TOK, prompt, response, 1)


def test_encode_ratings():
    batch = encode_ratings([RatedExample("a", "b", 3), RatedExample("", "cd", 1)], TOK, 8)
    assert batch["tokens"].tolist() == [
        [BOS, ord("a"), ord("b"), EOS],
        [BOS, ord("c"), ord("d"), EOS],
    ]
    assert batch["ratings"].tolist() == [3, 1] and batch["ratings"].dtype == torch.long
    floats = encode_ratings([RatedExample("a", "b", 0.5)], TOK, 8)["ratings"]
    assert floats.dtype.is_floating_point


def test_split_is_deterministic_and_prompt_disjoint():
    groups = [PreferenceGroup(f"prompt {i % 40}", ["a", "b"], [0, 1]) for i in range(200)]
    train, heldout = split_groups(groups, heldout_fraction=0.2, seed=3)
    assert (train, heldout) == split_groups(groups, heldout_fraction=0.2, seed=3)
    assert len(train) + len(heldout) == len(groups) and train and heldout
    assert {g.prompt for g in train}.isdisjoint(g.prompt for g in heldout)
    assert split_groups(groups, 0.2, seed=4) != (train, heldout)
    # Neither side is empty with two prompts, whatever the fraction.
    two = [PreferenceGroup("p", ["a", "b"], [0, 1]), PreferenceGroup("q", ["a", "b"], [0, 1])]
    for fraction in (1e-9, 1 - 1e-9):
        small_train, small_heldout = split_groups(two, fraction)
        assert len(small_train) == len(small_heldout) == 1
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_groups(groups, 0.0)
