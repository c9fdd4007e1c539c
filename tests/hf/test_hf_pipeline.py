"""RLHF from imported weights, the way a user runs it: `palm-rlhf import-hf` a tiny random
Cohere2 (sliding-window layers, a BPE with a chat model's end-of-turn token), then sft, reward,
ppo with LoRA, export-hf, and transformers reloads the export with our policy's logits. Along
the way every stage must read the checkpoint's BPE, never assume bytes (a spy counts each
stage's calls to HFTokenizer.encode), and carry it into what it saves."""

import json

import pytest
import torch
from bpe import tokenizer_files, write_tokenizer
from hf_models import save_hf_dir, tiny_hf_model, transformers

from palm_rlhf import PaLM
from palm_rlhf.cli import main
from palm_rlhf.data.corpus import TokenFile
from palm_rlhf.hf import HFTokenizer
from palm_rlhf.model.reward import RewardModel
from palm_rlhf.tokenizers.files import TOKENIZER_FILES

PROMPTS = ["def wrap(text):", "class Shlex:", "import os", "def split(s):", "return"]
RESPONSES = ["    return text", "    pass", "import sys", "    return s.split()", " None"]


@pytest.fixture
def encodes(monkeypatch):
    """How many times any stage encoded text with the Hugging Face tokenizer."""
    calls = []
    real = HFTokenizer.encode

    def spy(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFTokenizer, "encode", spy)
    return calls


def carries_tokenizer(directory) -> bool:
    expected = tokenizer_files()
    return all(
        (directory / name).read_text() == expected[name]
        for name in TOKENIZER_FILES
        if name in expected
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_pipeline")
    hf = tiny_hf_model("cohere2", sliding_window=6, num_hidden_layers=4)
    save_hf_dir(hf, root / "hf")
    with open(root / "sft.jsonl", "w") as handle:
        for i in range(24):
            row = {"prompt": PROMPTS[i % 5], "response": RESPONSES[i % 5]}
            handle.write(json.dumps(row) + "\n")
    with open(root / "prefs.jsonl", "w") as handle:
        for i in range(24):
            row = {"prompt": PROMPTS[i % 5], "chosen": RESPONSES[i % 5], "rejected": "x x x"}
            handle.write(json.dumps(row) + "\n")
    (root / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    (root / "rewards.py").write_text(
        "def brevity(prompts, responses, **fields):\n    return [-len(r) for r in responses]\n"
    )
    return root


TRAIN = ["--steps", "3", "--batch-size", "2", "--seq-len", "24", "--warmup-steps", "1",
         "--eval-every", "0", "--log-every", "1", "--cpu"]  # fmt: skip


def test_rlhf_from_imported_weights_and_back_to_transformers(work, encodes, capsys):
    # 1. import: the checkpoint holds the model and its tokenizer
    assert main(["import-hf", str(work / "hf"), "--out", str(work / "base")]) == 0
    assert carries_tokenizer(work / "base")
    assert PaLM.from_pretrained(work / "base").config.layer_types[-1] == "full"

    # 2. SFT, full fine-tune: the PPO reference is this model
    sft = ["sft", "--init", str(work / "base"), "--data", str(work / "sft.jsonl")]
    assert main([*sft, "--out", str(work / "sft"), *TRAIN, "--sample-every", "0"]) == 0
    assert encodes, "sft encoded its data without the checkpoint's tokenizer"
    assert carries_tokenizer(work / "sft" / "checkpoints" / "step_0000003")

    # 3. reward model from the SFT model
    encodes.clear()
    reward = ["reward", "--init", str(work / "sft"), "--data", str(work / "prefs.jsonl")]
    assert main([*reward, "--out", str(work / "rm"), *TRAIN, "--lora-rank", "4"]) == 0
    assert encodes and carries_tokenizer(work / "rm" / "checkpoints" / "step_0000003")

    # 4. PPO with LoRA against it
    encodes.clear()
    ppo = [
        "ppo", "--policy", str(work / "sft"), "--reward", str(work / "rm"),
        "--prompts", str(work / "prompts.txt"), "--out", str(work / "ppo"), "--iterations", "2",
        "--rollout-batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6",
        "--ppo-epochs", "1", "--cpu",
    ]  # fmt: skip
    assert main(ppo) == 0
    assert "processes=1" in capsys.readouterr().out
    assert encodes and carries_tokenizer(work / "ppo" / "policy")
    policy = PaLM.from_pretrained(work / "ppo" / "policy")
    assert list(policy.lora_configs) == ["actor"]

    # 5. export, adapter folded in; transformers computes our policy's logits
    assert main(["export-hf", str(work / "ppo" / "policy"), "--out", str(work / "export")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(work / "export").eval()
    assert type(reloaded).__name__ == "Cohere2ForCausalLM"
    tokenizer = HFTokenizer(tokenizer_files())
    tokens = torch.tensor([tokenizer.encode(PROMPTS[0] + RESPONSES[0] * 4, add_bos=True)])
    assert tokens.shape[1] > 6  # past the sliding window
    with torch.no_grad():
        ours = policy(tokens, lora_scope="actor")
        theirs = reloaded(tokens).logits
        untrained = PaLM.from_pretrained(work / "sft")(tokens)
    assert (ours - untrained).abs().max() > 1e-4  # PPO changed the policy ...
    assert (ours - theirs).abs().max() <= 1e-5  # ... and the export is that policy
    assert json.loads((work / "export" / "generation_config.json").read_text())["eos_token_id"]


def test_every_other_stage_reads_the_checkpoint_tokenizer(work, encodes, capsys):
    if not (work / "base").is_dir():
        assert main(["import-hf", str(work / "hf"), "--out", str(work / "base")]) == 0
    base = str(work / "base")
    stages = {
        "generate": ["generate", "--checkpoint", base, "--prompt", "def ", "--max-new-tokens", "4"],
        "sample": ["sample", "--policy", base, "--prompts", str(work / "prompts.txt"),
                   "--k", "2", "--max-new-tokens", "4", "--out", str(work / "tasks.jsonl")],
        "grpo": ["grpo", "--policy", base, "--prompts", str(work / "prompts.txt"),
                 "--reward-fn", f"{work / 'rewards.py'}:brevity", "--iterations", "1",
                 "--prompts-per-iteration", "2", "--group-size", "2", "--minibatch-size", "4",
                 "--max-new-tokens", "4", "--out", str(work / "grpo"), "--cpu"],
        "dpo": ["dpo", "--init", base, "--data", str(work / "prefs.jsonl"),
                "--out", str(work / "dpo"), *TRAIN],
    }  # fmt: skip
    for name, argv in stages.items():
        encodes.clear()
        assert main(argv) == 0, name
        assert encodes, f"{name} did not encode with the checkpoint's tokenizer"
    assert carries_tokenizer(work / "grpo" / "policy")
    assert carries_tokenizer(work / "dpo" / "checkpoints" / "step_0000003")


def test_pretraining_with_a_bpe_saves_it_and_stores_ids_beyond_bytes(tmp_path, encodes):
    write_tokenizer(tmp_path / "bpe")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def wrap(text, width=70):\n    return text.split()\n" * 40)
    argv = [
        "pretrain", "--tokenizer", str(tmp_path / "bpe"), "--data", str(corpus),
        "--out", str(tmp_path / "run"), "--dim", "16", "--depth", "1", "--heads", "2",
        "--dim-head", "8", "--max-seq-len", "32", *TRAIN,
    ]  # fmt: skip
    assert main(argv) == 0
    token_file = next((tmp_path / "run" / "cache").glob("train-*.tokens"))
    tokens = TokenFile.open(token_file).tokens
    assert int(tokens.max()) >= 259  # merged tokens: these are BPE ids, not bytes
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert carries_tokenizer(checkpoint)
    assert (
        PaLM.from_pretrained(checkpoint).config.num_tokens
        == HFTokenizer(tokenizer_files()).vocab_size
    )
    # --tokenizer is a fresh model's choice; an --init checkpoint brings its own.
    assert main(["sft", "--init", str(checkpoint), "--tokenizer", str(tmp_path / "bpe"),
                 "--data", str(corpus), "--out", str(tmp_path / "x")]) == 2  # fmt: skip


def test_a_reward_model_with_another_vocabulary_is_refused(work, tmp_path):
    from palm_rlhf import PaLMConfig
    from palm_rlhf.rl.ppo import PPOTrainer
    from palm_rlhf.tokenizers.files import load_tokenizer

    if not (work / "base").is_dir():
        assert main(["import-hf", str(work / "hf"), "--out", str(work / "base")]) == 0
    policy = PaLM.from_pretrained(work / "base")
    byte_rm = RewardModel(PaLM(PaLMConfig(num_tokens=320, dim=16, depth=1, heads=2, dim_head=8)))
    with pytest.raises(ValueError, match="reads another tokenizer than the policy"):
        PPOTrainer(
            policy, load_tokenizer(policy.tokenizer_files), PROMPTS, reward_model=byte_rm,
            out_dir=tmp_path / "ppo",
        )  # fmt: skip
