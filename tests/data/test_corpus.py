"""Data: corpus listing and errors, split rule, token cache (round trip, reuse, invalidation,
atomicity), packed windows and SFT masks checked against a hand-computed loss."""

import gzip
import json
import math
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.data.corpus import (
    PackedDataset,
    TokenFile,
    build_token_file,
    is_heldout,
    load_tokens,
    resolve_corpus,
    split_documents,
    stdlib_files,
)
from palm_rlhf.data.sft import SFTDataset, collate_sft

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def write_folder(root: Path, count: int = 60) -> dict[str, str]:
    """A small corpus folder with nested files; returns name -> text."""
    texts = {
        f"dir{i % 3}/doc{i:03d}.txt": f"document {i}\nsecond line é {i * 7}\n" for i in range(count)
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return texts


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def stream_of(docs: list[str]) -> list[int]:
    """The token file's layout: every document is bos + doc + eos (tokenizers/base.py)."""
    return [t for doc in docs for t in [TOK.bos_id, *TOK.encode(doc), EOS]]


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


# ----------------------------------------------------------------------------- stdlib and split


def test_stdlib_listing_is_sorted_python_source_without_site_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 100
    assert names == sorted(names)
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert not any({"site-packages", "dist-packages"} & set(p.parts) for p in files)
    assert "json/decoder.py" in names


def test_heldout_fraction_on_stdlib_is_about_two_percent_and_stable():
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [p.relative_to(root).as_posix() for p in stdlib_files()]
    flags = [is_heldout(n) for n in names]
    assert 0.01 <= sum(flags) / len(names) <= 0.035
    assert flags == [is_heldout(n) for n in names]
    assert is_heldout("a/b.py", 0.5) == is_heldout("a/b.py", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        is_heldout("x", 0.0)


def test_folder_splits_by_file_and_both_splits_are_non_empty(tmp_path):
    texts = write_folder(tmp_path)
    sources = resolve_corpus(str(tmp_path))
    assert [s.name for s in sources] == sorted(texts)
    train = list(split_documents(sources, "train"))
    heldout = list(split_documents(sources, "heldout"))
    assert train and heldout
    assert sorted(train + heldout) == sorted(texts.values())
    expected = [texts[n] for n in sorted(texts) if is_heldout(n)] or [texts[sorted(texts)[-1]]]
    assert heldout == expected


def test_single_file_splits_by_document_index_and_small_corpora_hold_out_the_last(tmp_path):
    many = write_jsonl(tmp_path / "many.jsonl", [{"text": f"doc {i}"} for i in range(200)])
    heldout = list(split_documents(resolve_corpus(str(many)), "heldout"))
    train = list(split_documents(resolve_corpus(str(many)), "train"))
    assert 0 < len(heldout) < 20 and len(train) + len(heldout) == 200
    few = write_jsonl(tmp_path / "few.jsonl", [{"text": f"doc {i}"} for i in range(3)])
    assert list(split_documents(resolve_corpus(str(few)), "heldout")) == ["doc 2"]
    assert list(split_documents(resolve_corpus(str(few)), "train")) == ["doc 0", "doc 1"]


def test_single_document_holds_out_its_last_lines(tmp_path):
    (tmp_path / "book.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    sources = resolve_corpus(str(tmp_path / "book.txt"))
    assert list(split_documents(sources, "heldout")) == ["line 98\nline 99\n"]
    assert list(split_documents(sources, "train"))[0].endswith("line 97\n")
    (tmp_path / "one.txt").write_text("just one line")
    with pytest.raises(ValueError, match="one.txt.*single-line"):
        list(split_documents(resolve_corpus(str(tmp_path / "one.txt")), "train"))


# ----------------------------------------------------------------------------- corpus errors


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_corpus(str(tmp_path / "nope.txt"))


def test_empty_file_and_empty_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        resolve_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / ".hidden").write_text("secret")
    with pytest.raises(ValueError, match="folder.*no files"):
        resolve_corpus(str(tmp_path / "folder"))
    (tmp_path / "folder" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="folder.*every file is empty"):
        resolve_corpus(str(tmp_path / "folder"))


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"\x00\x01", r"bad\.bin: binary file"), (b"ok\n\xff\xfe", r"bad\.bin:2: not valid UTF-8")],
)
def test_binary_and_invalid_utf8_name_the_file(tmp_path, data, problem):
    (tmp_path / "bad.bin").write_bytes(data)
    with pytest.raises(ValueError, match=problem):
        resolve_corpus(str(tmp_path / "bad.bin"))
    (tmp_path / "good.txt").write_text("fine")
    sources = resolve_corpus(str(tmp_path))  # a folder: the bad file fails when it is read
    with pytest.raises(ValueError, match=problem):
        for split in ("train", "heldout"):
            list(split_documents(sources, split))


def test_jsonl_errors_give_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3: not valid JSON"):
        list(resolve_corpus(str(path))[0].documents())
    write_jsonl(path, [{"text": "a"}, {"body": "b"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: missing field 'text'"):
        list(resolve_corpus(str(path))[0].documents())
    write_jsonl(path, [{"text": "a"}, {"text": 3}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: field 'text' must be a string, got int"):
        list(resolve_corpus(str(path))[0].documents())
    write_jsonl(path, [{"body": "a"}])
    assert list(resolve_corpus(str(path), jsonl_field="body")[0].documents()) == ["a"]
    write_jsonl(path, [{"text": ""}, {"text": ""}])
    with pytest.raises(ValueError, match="c.jsonl: empty corpus"):
        resolve_corpus(str(path))


def test_gzip_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("héllo\nworld\n".encode()))
    assert list(resolve_corpus(str(tmp_path / "a.txt.gz"))[0].documents()) == ["héllo\nworld\n"]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n{"text": "y"}\n'))
    assert list(resolve_corpus(str(tmp_path / "b.jsonl.gz"))[0].documents()) == ["x", "y"]
    (tmp_path / "c.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="c.gz: not a valid gzip file"):
        resolve_corpus(str(tmp_path / "c.gz"))


# ----------------------------------------------------------------------------- token cache


def test_token_file_round_trip_and_num_bytes(tmp_path):
    write_folder(tmp_path / "corpus")
    sources = resolve_corpus(str(tmp_path / "corpus"))
    for split in ("train", "heldout"):
        docs = list(split_documents(sources, split))
        token_file = TokenFile.open(build_token_file(sources, TOK, tmp_path / "cache", split))
        assert token_file.tokens.dtype == torch.int16
        assert token_file.tokens.tolist() == stream_of(docs)
        assert TOK.decode(token_file.tokens) == "".join(docs)
        assert token_file.num_bytes == sum(len(d.encode()) for d in docs)
        assert token_file.num_documents == len(docs)
        assert torch.equal(load_tokens(token_file.path), token_file.tokens)


class WideTokenizer(ByteTokenizer):
    """Bytes shifted into ids above 32,768, as a 256k vocabulary's ids are."""

    offset = 40_000

    def __init__(self):
        super().__init__()
        self.vocab_size = self.offset + 259

    def encode(self, text, add_bos=False, add_eos=False):
        ids = super().encode(text, add_bos, add_eos)
        return [i + self.offset if i < 256 else i for i in ids]


def test_token_files_hold_ids_of_any_vocabulary_size(tmp_path):
    write_folder(tmp_path / "corpus")
    sources = resolve_corpus(str(tmp_path / "corpus"))
    wide = WideTokenizer()
    token_file = TokenFile.open(build_token_file(sources, wide, tmp_path / "cache", "train"))
    docs = list(split_documents(sources, "train"))
    assert token_file.tokens.dtype == torch.int32
    expected = [i for doc in docs for i in wide.encode(doc, add_bos=True, add_eos=True)]
    assert token_file.tokens.tolist() == expected and max(expected) > 2**15


def test_cache_is_reused_and_invalidated_by_edits_and_tokenizer(tmp_path, monkeypatch):
    write_folder(tmp_path / "corpus")
    cache = tmp_path / "cache"
    sources = resolve_corpus(str(tmp_path / "corpus"))
    first = build_token_file(sources, TOK, cache, "train")
    calls, encode = [], ByteTokenizer.encode
    monkeypatch.setattr(ByteTokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    assert build_token_file(resolve_corpus(str(tmp_path / "corpus")), TOK, cache, "train") == first
    assert len(calls) == 1  # only the cache-key probe; no document was tokenized again
    monkeypatch.undo()

    edited = tmp_path / "corpus" / "dir0" / "doc000.txt"
    edited.write_text("changed and longer text\n")
    second = build_token_file(resolve_corpus(str(tmp_path / "corpus")), TOK, cache, "train")
    assert second != first
    os.utime(edited, ns=(10**18, 10**18))  # same size, new mtime
    third = build_token_file(resolve_corpus(str(tmp_path / "corpus")), TOK, cache, "train")
    assert third not in (first, second)

    class OtherTokenizer(ByteTokenizer):
        pass

    sources = resolve_corpus(str(tmp_path / "corpus"))
    assert build_token_file(sources, OtherTokenizer(), cache, "train") != third
    assert build_token_file(sources, TOK, cache, "heldout") != third


def test_crash_while_writing_leaves_no_cache_and_a_retry_works(tmp_path, monkeypatch):
    write_folder(tmp_path / "corpus")
    sources = resolve_corpus(str(tmp_path / "corpus"))
    cache = tmp_path / "cache"

    def crash(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_file(sources, TOK, cache, "train")
    assert cache_files(cache) == []  # no final file and no temporary left behind
    monkeypatch.undo()
    path = build_token_file(sources, TOK, cache, "train")
    assert cache_files(cache) == sorted([path.name, path.with_suffix(".json").name])
    assert TOK.decode(load_tokens(path)) == "".join(split_documents(sources, "train"))


def test_incomplete_or_truncated_cache_is_rebuilt_not_trusted(tmp_path):
    write_folder(tmp_path / "corpus")
    sources = resolve_corpus(str(tmp_path / "corpus"))
    path = build_token_file(sources, TOK, tmp_path / "cache", "train")
    expected = load_tokens(path).clone()
    path.write_bytes(path.read_bytes()[:-10])  # truncated behind the sidecar's back
    with pytest.raises(ValueError, match="bytes, but the sidecar says"):
        TokenFile.open(path)
    assert build_token_file(sources, TOK, tmp_path / "cache", "train") == path
    assert torch.equal(load_tokens(path), expected)
    path.with_suffix(".json").unlink()  # killed between the token file and its sidecar
    with pytest.raises(FileNotFoundError, match="sidecar"):
        TokenFile.open(path)
    build_token_file(sources, TOK, tmp_path / "cache", "train")
    assert torch.equal(load_tokens(path), expected)


# ----------------------------------------------------------------------------- packed windows


def test_packed_windows_are_exact():
    stream = torch.arange(11, dtype=torch.int16)
    data = PackedDataset(stream, seq_len=3)
    assert len(data) == 3  # (11 - 1) // 3
    assert [data[i].tolist() for i in range(3)] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert data[0].dtype == torch.long
    with pytest.raises(IndexError):
        data[3]
    assert len(PackedDataset(torch.arange(4), seq_len=3)) == 1
    with pytest.raises(ValueError, match="3 tokens; one window of seq_len=3 needs at least 4"):
        PackedDataset(torch.arange(3), seq_len=3)


# ----------------------------------------------------------------------------- SFT


def sft_items(tmp_path: Path, rows: list[dict], max_seq_len: int) -> list[dict]:
    data = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), TOK, max_seq_len)
    return [data[i] for i in range(len(data))]


def test_sft_tokens_and_masks_by_hand(tmp_path):
    (item,) = sft_items(tmp_path, [{"prompt": "ab", "response": "c"}], max_seq_len=16)
    assert item["tokens"].tolist() == [BOS, 97, 98, 99, EOS]
    assert item["loss_mask"].tolist() == [False, False, False, True, True]
    # A long prompt loses tokens from its left; bos stays.
    (item,) = sft_items(tmp_path, [{"prompt": "abcdef", "response": "xy"}], max_seq_len=6)
    assert item["tokens"].tolist() == [BOS, ord("e"), ord("f"), ord("x"), ord("y"), EOS]
    assert item["loss_mask"].tolist() == [False, False, False, True, True, True]
    # A response that alone does not fit is cut at its end, with no eos: it did not end there.
    (item,) = sft_items(tmp_path, [{"prompt": "ab", "response": "vwxyz"}], max_seq_len=4)
    assert item["tokens"].tolist() == [BOS, ord("v"), ord("w"), ord("x")]
    assert item["loss_mask"].tolist() == [False, True, True, True]


def test_sft_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: missing field 'response'"):
        sft_items(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a"}], 16)
    with pytest.raises(ValueError, match=r"sft\.jsonl:1: field 'prompt' must be a string"):
        sft_items(tmp_path, [{"prompt": ["a"], "response": "b"}], 16)
    with pytest.raises(ValueError, match="no examples"):
        sft_items(tmp_path, [], 16)


def test_collate_sft_right_pads():
    batch = [
        {"tokens": torch.tensor([BOS, 1, 2, EOS]), "loss_mask": torch.tensor([0, 0, 1, 1]).bool()},
        {"tokens": torch.tensor([BOS, 3, EOS]), "loss_mask": torch.tensor([0, 1, 1]).bool()},
    ]
    out = collate_sft(batch, pad_id=PAD)
    assert out["tokens"].tolist() == [[BOS, 1, 2, EOS], [BOS, 3, EOS, PAD]]
    assert out["mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert out["loss_mask"].tolist() == [[False, False, True, True], [False, True, True, False]]
    assert out["tokens"].dtype == torch.long and out["loss_mask"].dtype == torch.bool


def test_sft_loss_is_cross_entropy_on_response_positions_only(tmp_path):
    rows = [{"prompt": "Q: 2+2?", "response": " 4"}, {"prompt": "Hi", "response": " there!"}]
    batch = collate_sft(sft_items(tmp_path, rows, max_seq_len=64), pad_id=PAD)
    tokens, mask, loss_mask = batch["tokens"], batch["mask"], batch["loss_mask"]
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=259, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=128))
    model.eval()
    captured = []
    model.register_forward_hook(lambda module, args, output: captured.append(output))
    loss = model.loss(tokens, mask=mask, loss_mask=loss_mask)

    with torch.no_grad():  # the full logits, (b, n - 1, vocab): predictions of tokens[:, 1:]
        logprobs = F.log_softmax(model(tokens[:, :-1], mask=mask[:, :-1]).float(), dim=-1)
    nats = []
    for row in range(tokens.shape[0]):
        for pos in range(1, tokens.shape[1]):
            if loss_mask[row, pos]:
                nats.append(-logprobs[row, pos - 1, tokens[row, pos]].item())
    assert len(nats) == len(" 4") + 1 + len(" there!") + 1  # response bytes + eos per row
    assert loss.item() == pytest.approx(sum(nats) / len(nats), rel=1e-5)

    # Prompt targets contribute nothing: the loss has no gradient through their log-probs
    # (the per-token statistics the model's loss is computed from; no full logits exist).
    token_logprobs = captured[0].logprobs  # (b, n - 1)
    token_logprobs.retain_grad()
    loss.backward()
    is_target = loss_mask[:, 1:]  # position p predicts token p + 1
    grad = token_logprobs.grad.abs()
    assert torch.all(grad[~is_target] == 0)
    assert torch.all(grad[is_target] > 0)
    assert math.isfinite(loss.item())
