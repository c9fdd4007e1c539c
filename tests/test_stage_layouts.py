"""Hand-offs between stages: the rows one stage builds are the rows the next one reads.

Each layout has one owner (tokenizer.encode_prompt for the policy's input, preferences.
encode_completion for the reward model's rows, data.build_token_file for pretraining, data.
SFTDataset for SFT); these tests feed the same data through two stages and compare.
"""

import json

import pytest
import torch
from conftest import assert_close_f32, tiny_model

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.data.corpus import TokenFile, build_token_file, resolve_corpus
from palm_rlhf.data.preferences import PreferenceGroup, encode_groups
from palm_rlhf.data.sft import SFTDataset
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.rl.config import PPOConfig
from palm_rlhf.rl.ppo import PPOTrainer
from palm_rlhf.tokenizers.base import encode_prompt, pad_sequences
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.reward import train_reward

TOK = ByteTokenizer()


def reward_model(max_seq_len: int = 0) -> RewardModel:
    torch.manual_seed(3)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=96)
    )
    model = RewardModel(trunk, RewardConfig(max_seq_len=max_seq_len)).eval()
    with torch.no_grad():  # scores that differ clearly between rows
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
        model.score_mean.fill_(0.7)
        model.score_std.fill_(1.9)
    return model


def trainer_for(model: RewardModel, **overrides) -> PPOTrainer:
    policy = tiny_model(num_tokens=TOK.vocab_size, max_seq_len=96)
    values = dict(rollout_batch_size=4, minibatch_size=2, max_new_tokens=8, max_prompt_tokens=16)
    return PPOTrainer(
        policy,
        TOK,
        ["x"],
        reward_model=model,
        config=PPOConfig(**{**values, **overrides}, no_eos_penalty=float("nan")),
        show_progress=False,
    )


def sampled(responses: list[str], finished: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Response ids as generate returns them: eos after a finished response, then pad."""
    rows = [
        TOK.encode(r) + ([TOK.eos_id] if f else [])
        for r, f in zip(responses, finished, strict=True)
    ]
    return pad_sequences(rows, TOK.pad_id, "right")


@pytest.mark.parametrize(
    "prompt, limit",
    [
        ("def f(x):\n", 48),  # everything fits
        ("import os\nimport sys\nclass Parser(object):\n", 24),  # the prompt is cut from the left
    ],
)
def test_ppo_scores_exactly_the_rows_reward_training_built(prompt, limit):
    # Bugs caught: PPO prepended a second bos to a prompt that already had one, scored a
    # response without eos at its last byte, and cut rows by the trunk's length, not training's.
    model = reward_model(max_seq_len=limit)
    responses = ["    return x\n", "  pass"]
    trained = encode_groups([PreferenceGroup(prompt, responses, [0, 1])], TOK, limit)
    # The reward model scores the prompt as the policy saw it; here the policy saw all of it.
    trainer = trainer_for(model, max_prompt_tokens=64)
    prompt_row = encode_prompt(TOK, prompt, trainer.config.max_prompt_tokens)
    tokens, mask = sampled(responses, finished=[True, False])
    rows, row_mask = trainer.engine.reward_rows([prompt_row, prompt_row], tokens, mask)
    assert torch.equal(rows, trained["tokens"]) and torch.equal(row_mask, trained["mask"])
    for row, keep in zip(rows, row_mask, strict=True):
        real = row[keep].tolist()
        assert real[0] == TOK.bos_id and real.count(TOK.bos_id) == 1
        assert real[-1] == TOK.eos_id and len(real) <= limit
    scores = trainer.engine.score([prompt] * 2, responses, tokens, mask, [prompt_row, prompt_row])[
        1
    ]
    expected = model(trained["tokens"], trained["mask"], normalized=True)
    assert torch.equal(scores, expected)


def test_an_unfinished_response_is_scored_as_if_it_ended():
    # The decision under test: rows always end in eos (training texts carry no "finished"
    # flag), so finished and unfinished samples of the same text get the same score.
    model = reward_model(max_seq_len=48)
    trainer = trainer_for(model)
    row = encode_prompt(TOK, "x = 1\n", 16)
    tokens, mask = sampled(["y = 2\n", "y = 2\n"], finished=[True, False])
    rows, row_mask = trainer.engine.reward_rows([row, row], tokens, mask)
    assert torch.equal(rows[0], rows[1]) and torch.equal(row_mask[0], row_mask[1])
    assert rows[1][row_mask[1]].tolist()[-1] == TOK.eos_id
    scores = trainer.engine.score(["x = 1\n"] * 2, ["y = 2\n"] * 2, tokens, mask, [row, row])[1]
    # Identical rows; the scores may differ in the last bit by batch position on some CPUs.
    assert_close_f32(scores[0], scores[1])


def test_reward_training_records_its_length_and_ppo_cuts_to_it(tmp_path):
    # Hand-off: the length train_reward trained at reaches PPO through the saved config.
    torch.manual_seed(0)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=96)
    )
    trunk.save_pretrained(tmp_path / "trunk")
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"q{i}: " + "z" * 30, "chosen": "aa", "rejected": "b"})
            for i in range(8)
        )
        + "\n"
    )
    config = TrainConfig(seq_len=20, batch_size=2, steps=2, warmup_steps=1, log_every=1)
    train_reward(tmp_path / "trunk", data, config, out_dir=tmp_path / "rm", show_progress=False)
    model = RewardModel.from_pretrained(tmp_path / "rm")
    assert model.config.max_seq_len == 20 and model.max_row_len == 20
    trainer = trainer_for(model)
    tokens, mask = sampled(["aa"], finished=[False])
    prompt_row = encode_prompt(TOK, "q0: " + "z" * 30, 64)
    rows, row_mask = trainer.engine.reward_rows([prompt_row], tokens, mask)
    trained = encode_groups([PreferenceGroup("q0: " + "z" * 30, ["aa", "b"], [0, 1])], TOK, 20)
    assert rows[0][row_mask[0]].tolist() == trained["tokens"][0][trained["mask"][0]].tolist()
    assert int(row_mask[0].sum()) == 20


def test_every_stage_starts_its_sequences_with_bos(tmp_path, monkeypatch):
    # Bug caught: pretraining windows never showed bos although every later stage starts with it.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\nline two\n" * 3)
    path = build_token_file(resolve_corpus(str(corpus)), TOK, tmp_path / "cache", "train")
    stream = TokenFile.open(path).tokens.long().tolist()
    assert stream[0] == TOK.bos_id
    eos_at = [i for i, t in enumerate(stream) if t == TOK.eos_id]
    assert eos_at and all(stream[i + 1] == TOK.bos_id for i in eos_at[:-1])
    assert stream.count(TOK.bos_id) == len(eos_at)  # one bos per document

    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert SFTDataset(sft, TOK, 32)[0]["tokens"][0].item() == TOK.bos_id

    rows = encode_groups([PreferenceGroup("p", ["a", "b"], [0, 1])], TOK, 32)
    assert (rows["tokens"][:, 0] == TOK.bos_id).all()

    # PPO: every policy row begins (after left padding) with exactly one bos, even when the
    # prompt is cut to max_prompt_tokens.
    trainer = trainer_for(reward_model(), max_prompt_tokens=6)
    rollout, _, _ = trainer.rollout(["a much longer prompt than six tokens", "hi"])
    for seq, seq_mask in zip(rollout.samples.sequences, rollout.samples.sequence_mask, strict=True):
        real = seq[seq_mask].tolist()
        assert real[0] == TOK.bos_id and real.count(TOK.bos_id) == 1

    # generate (the CLI) hands the model [bos] + prompt.
    import palm_rlhf.cli
    import palm_rlhf.cli.stages

    seen = {}

    def fake_generate(model, prompts, **kwargs):
        seen["prompts"] = prompts
        raise SystemExit(0)

    model = tiny_model(num_tokens=TOK.vocab_size)
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(palm_rlhf.cli.stages, "generate", fake_generate)
    with pytest.raises(SystemExit):
        palm_rlhf.cli.main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def "])
    assert seen["prompts"] == [[TOK.bos_id, *TOK.encode("def ")]]


def test_encode_prompt_keeps_bos_when_cutting():
    assert encode_prompt(TOK, "abcdef", 4) == [TOK.bos_id, *TOK.encode("def")]
    assert encode_prompt(TOK, "ab", 10) == [TOK.bos_id, *TOK.encode("ab")]
    assert encode_prompt(TOK, "ab", 1) == [TOK.bos_id]
    with pytest.raises(ValueError, match="max_tokens"):
        encode_prompt(TOK, "ab", 0)
