"""Every Cohere / Cohere2 `config.json` as the hub publishes it (tests/hf/hub_configs/, sizes
shrunk, every other key kept) and as the installed transformers saves one imports into the
model transformers builds from the same file; keys that contradict the model are refused by
name."""

import copy
import json
from pathlib import Path

import pytest
import torch
from bpe import VOCAB, write_tokenizer
from conftest import float32_bound
from hf_models import left_padded_positions, transformers

from palm_rlhf import PaLM
from palm_rlhf.cli import main
from palm_rlhf.hf import import_hf
from palm_rlhf.hf.config import palm_config_from_hf

HUB_CONFIGS = Path(__file__).parent / "hub_configs"
PUBLISHED = sorted(path.stem for path in HUB_CONFIGS.glob("*.json"))
WINDOW = 6  # a sliding window the 40-token inputs below really slide over


def published(name: str) -> dict:
    return json.loads((HUB_CONFIGS / f"{name}.json").read_text())


def saved_by_transformers(model_type: str) -> dict:
    """The config.json the installed transformers writes for its default config of a type."""
    cls = transformers.Cohere2Config if model_type == "cohere2" else transformers.CohereConfig
    return cls().to_dict()


def shrink(config: dict) -> dict:
    """The same file at test size: width, depth, heads, vocabulary and window shrunk, grouped-
    query attention kept grouped (and multi-head kept multi-head), every other key unchanged.
    Cohere2 keeps 8 layers of its own pattern, so full and sliding layers both appear."""
    small = copy.deepcopy(config)
    multi_head = config["num_key_value_heads"] in (None, config["num_attention_heads"])
    small.update(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=88,  # no multiple of the width, like Cohere's 22528 / 8192
        num_attention_heads=4,
        num_key_value_heads=4 if multi_head else 2,
    )
    if "head_dim" in small:
        small["head_dim"] = 8
    if config["model_type"] == "cohere2":
        small["num_hidden_layers"] = 8
        small["sliding_window"] = WINDOW
        if "layer_types" in small:
            small["layer_types"] = small["layer_types"][:8]
    else:
        small["num_hidden_layers"] = 2
    return small


def build_from(config: dict, directory: Path, seed: int = 0):
    """transformers' model of `config`, loaded as users load it (AutoConfig of the directory),
    with random weights large enough to separate tokens; saved with the file left exactly as
    given (save_pretrained would rewrite it in the installed version's words)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.normal_(0, 0.25)
            else:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory)
    return model


CASES = [*PUBLISHED, "transformers-cohere", "transformers-cohere2"]


def case_config(case: str) -> dict:
    if case.startswith("transformers-"):
        return saved_by_transformers(case.removeprefix("transformers-"))
    return published(case)


def test_the_published_files_are_the_ones_the_import_must_handle():
    """The folder holds both families and the keys the import used to refuse (issue 19's
    count: 7 of 13 files imported); a file dropped or reduced would weaken the test below."""
    configs = [published(name) for name in PUBLISHED]
    assert len(configs) >= 12
    assert {c["model_type"] for c in configs} == {"cohere", "cohere2"}
    keys = set().union(*configs)
    assert {
        "pretraining_tp", "layer_switch", "use_parallel_block", "use_parallel_embedding",
        "sliding_window_pattern", "_sliding_window_pattern", "use_qk_norm", "rotary_pct",
    } <= keys  # fmt: skip
    assert any("layer_types" not in c for c in configs if c["model_type"] == "cohere2")
    assert any(c["vocab_size"] == 262144 for c in configs)  # tiny-aya's vocabulary


@pytest.mark.parametrize("case", CASES)
def test_a_published_config_imports_as_the_model_transformers_builds(tmp_path, case):
    config = shrink(case_config(case))
    hf = build_from(config, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours", show_progress=False)
    ours = PaLM.from_pretrained(tmp_path / "ours")

    # The layer pattern is the one transformers derived from the same file.
    if config["model_type"] == "cohere2":
        derived = ["sliding" if t == "sliding_attention" else "full" for t in hf.config.layer_types]
        assert list(ours.config.layer_types) == derived
        assert "sliding" in derived and "full" in derived

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 40))  # 40 > WINDOW: sliding layers slide
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :13] = False
    padded = tokens.masked_fill(~mask, 0)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
        expected_padded = hf(
            padded, attention_mask=mask.long(), position_ids=left_padded_positions(mask)
        ).logits
        got_padded = ours(padded, mask=mask)
    # Logits that separate tokens (a near-uniform model would agree with anything).
    assert expected.argmax(-1).unique().numel() > 10
    # 1e-5, or 64 float32 roundings of the largest logit where logits reach past ~2
    # (tiny-aya's logit_scale is 1): the two models sum their products in different orders.
    for theirs, mine in ((expected, got), (expected_padded[mask], got_padded[mask])):
        assert (theirs - mine).abs().max() <= max(1e-5, float32_bound(theirs, mine))


@pytest.mark.parametrize(
    "name, edit, named",
    [
        ("c4ai-command-r7b-12-2024", {"use_parallel_block": False}, "use_parallel_block: False"),
        ("c4ai-command-r7b-12-2024", {"rotary_pct": 0.5}, "rotary_pct: 0.5"),
        ("c4ai-command-r7b-12-2024", {"layer_switch": 2}, "layer_switch: 2 says every 2th"),
        ("c4ai-command-r7b-12-2024", {"sliding_window_pattern": 0}, "sliding_window_pattern"),
        ("c4ai-command-r7b-12-2024", {"use_parallel_embedding": "yes"}, "use_parallel_embedding"),
        ("tiny-aya-earth", {"_sliding_window_pattern": 3}, "_sliding_window_pattern: 3"),
        ("tiny-aya-earth", {"use_qk_norm": True}, "use_qk_norm: True is not supported"),
        ("c4ai-command-r-v01", {"pretraining_tp": 0}, "pretraining_tp: must be a positive int"),
        ("c4ai-command-r-v01", {"use_parallel_block": False}, "use_parallel_block"),
    ],
)
def test_keys_that_contradict_the_model_are_refused_by_name(name, edit, named):
    config = {**shrink(published(name)), **edit}
    with pytest.raises(ValueError, match=named):
        palm_config_from_hf(config)


def test_sliding_window_pattern_alone_gives_transformers_layer_types():
    """A file with only `sliding_window_pattern` (no layer_types): the same layers as
    transformers derives, for a pattern other than the default too."""
    for pattern in (None, 2, 3):
        config = shrink(published("c4ai-command-r7b-12-2024"))
        del config["layer_switch"]
        if pattern is None:
            del config["sliding_window_pattern"]
        else:
            config["sliding_window_pattern"] = pattern
        theirs = transformers.Cohere2Config(**config).layer_types
        ours = palm_config_from_hf(config).layer_types
        assert list(ours) == ["sliding" if t == "sliding_attention" else "full" for t in theirs]


def test_the_readme_import_example_runs_as_written(tmp_path, monkeypatch):
    """The README's `palm-rlhf import-hf` line, word for word, on Command R7B's published file
    (shrunk) standing in for the download in models/command-r7b."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("palm-rlhf import-hf ")]
    assert lines, "the README has no import-hf example"
    words = lines[0].split("#")[0].split()
    assert "models/command-r7b" in words
    monkeypatch.chdir(tmp_path)
    hf = build_from(shrink(published("c4ai-command-r7b-12-2024")), tmp_path / "models/command-r7b")
    assert main(words[1:]) == 0
    out = Path(words[words.index("--out") + 1])
    tokens = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        expected, got = hf(tokens).logits, PaLM.from_pretrained(out)(tokens)
    assert (expected - got).abs().max() <= max(1e-5, float32_bound(expected, got))
