"""Every flag a subcommand shows in --help reaches the code that runs it, or is refused with a
message naming it. (Bug caught: `palm-rlhf reward` accepted --grad-accum, --time-limit-s,
--eval-batches, --sample-every, --sample-prompt and --jsonl-field and ignored them all; `sft`
took --preset and every model flag and ignored them.)

How: the stage entry points (train_lm, train_reward, PPOTrainer, generate, the reward model's
forward, run_demo, make_accelerator) are replaced by recorders. For each flag, the command runs
once with the flag set to a value other than its default; what the recorders saw must differ
from a run without the flag, or the command must fail naming the flag. A second test checks
statically that every config field a loop receives is read by that loop.
"""

import dataclasses
import inspect
import json
import re

import pytest
import torch
from bpe import write_tokenizer

import palm_rlhf.cli as cli
import palm_rlhf.cli.chat
import palm_rlhf.cli.demo
import palm_rlhf.cli.hf
import palm_rlhf.cli.label
import palm_rlhf.cli.options
import palm_rlhf.cli.rl
import palm_rlhf.cli.stages
import palm_rlhf.demo
import palm_rlhf.hf.convert
import palm_rlhf.label.server
import palm_rlhf.model.reward
import palm_rlhf.rl.grpo
import palm_rlhf.rl.online
import palm_rlhf.rl.ppo
import palm_rlhf.training.dpo
import palm_rlhf.training.lm
import palm_rlhf.training.reward
import palm_rlhf.training.state
from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.label.tasks import Task, write_tasks
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.training.config import DPOConfig, TrainConfig


class Reached(Exception):
    """Raised by a recorder: the command got as far as the stage it runs."""


def normalise(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: normalise(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if hasattr(value, "vocab_size") and hasattr(value, "encode"):  # a tokenizer: which one
        return f"{type(value).__name__}({value.vocab_size})"
    if isinstance(value, torch.nn.Module):  # which weights, on which device
        first = next(value.parameters()).detach()
        checksum = "meta" if first.is_meta else f"{float(first.float().sum()):.6g}"
        return f"{type(value).__name__}@{first.device}:{checksum}"
    return str(value)


class FakeAccelerator:
    is_main_process, num_processes, process_index = True, 1, 0
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    tok = ByteTokenizer()
    config = PaLMConfig(num_tokens=tok.vocab_size, dim=16, depth=1, heads=2, dim_head=8)
    for suffix, seed in (("", 0), ("2", 1)):
        torch.manual_seed(seed)
        PaLM(config).save_pretrained(root / f"policy{suffix}")
        RewardModel(PaLM(config), RewardConfig()).save_pretrained(root / f"rm{suffix}")
    (root / "prompts.txt").write_text("def f():\nclass A:\n")
    (root / "other_prompts.txt").write_text("import os\n")
    (root / "prefs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}))
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (root / "corpus.txt").write_text("print(1)\n" * 50)
    write_tokenizer(root / "bpe")
    for name, count in (("tasks.jsonl", 2), ("tasks2.jsonl", 3)):
        write_tasks(
            [Task(f"t{i}", "p", ["a", "b"], [True, True]) for i in range(count)], root / name
        )
    return root


def base_commands(root) -> dict[str, list[str]]:
    return {
        "pretrain": ["pretrain", "--out", str(root / "o"), "--data", str(root / "corpus.txt")],
        "sft": [
            "sft", "--out", str(root / "o"), "--init", str(root / "policy"),
            "--data", str(root / "sft.jsonl"),
        ],
        "reward": [
            "reward", "--out", str(root / "o"), "--init", str(root / "policy"),
            "--data", str(root / "prefs.jsonl"),
        ],
        "ppo": [
            "ppo", "--out", str(root / "o"), "--policy", str(root / "policy"),
            "--reward", str(root / "rm"), "--prompts", str(root / "prompts.txt"),
        ],
        "generate": ["generate", "--checkpoint", str(root / "policy"), "--prompt", "a"],
        "score": [
            "score", "--checkpoint", str(root / "rm"), "--prompt", "p", "--response", "r",
        ],
        "demo": ["demo", "--out", str(root / "o")],
        "sample": ["sample", "--policy", str(root / "policy"), "--out", str(root / "t.jsonl")],
        "label": ["label", "--tasks", str(root / "tasks.jsonl"), "--out", str(root / "r.jsonl")],
        "grpo": [
            "grpo", "--out", str(root / "o"), "--policy", str(root / "policy"),
            "--prompts", str(root / "prompts.txt"),
            "--reward-fn", "palm_rlhf.arithmetic:exact_match",
        ],
        "dpo": [
            "dpo", "--out", str(root / "o"), "--init", str(root / "policy"),
            "--data", str(root / "prefs.jsonl"),
        ],
        "chat": ["chat", str(root / "policy")],
        "import-hf": ["import-hf", str(root / "hf"), "--out", str(root / "imported")],
        "export-hf": ["export-hf", str(root / "policy"), "--out", str(root / "exported")],
    }  # fmt: skip


# Values for flags whose type alone does not give a valid non-default value.
SPECIAL = {
    "--data": lambda root, sub: str(root / ("sft.jsonl" if sub == "sft" else "other.jsonl")),
    "--init": lambda root, sub: str(root / "policy2"),
    "--policy": lambda root, sub: str(root / "policy2"),
    "--reward": lambda root, sub: str(root / "rm2"),
    "--checkpoint": lambda root, sub: str(root / ("rm2" if sub == "score" else "policy2")),
    "--top-k": lambda root, sub: "5",
    "--num-prompts": lambda root, sub: "5",
    "--prompts": lambda root, sub: str(root / "other_prompts.txt"),
    "--out": lambda root, sub: str(root / f"elsewhere-{sub}"),
    "--tasks": lambda root, sub: str(root / "tasks2.jsonl"),
    "--host": lambda root, sub: "0.0.0.0",
    "--label-host": lambda root, sub: "0.0.0.0",
    "--allowed-hosts": lambda root, sub: "lab.example",
    "--target": lambda root, sub: "3",
    "--label-target": lambda root, sub: "3",
    "--label-port": lambda root, sub: "9999",
    "--prompt": lambda root, sub: "b",
    "--response": lambda root, sub: "s",
    "--mixed-precision": lambda root, sub: "bf16",
    "--base-dtype": lambda root, sub: "bfloat16",
    "--log-with": lambda root, sub: "tensorboard",
    "--lora-scope": lambda root, sub: "actor",
    "--device": lambda root, sub: "meta",
    "--sample-prompt": lambda root, sub: "class ",
    "--jsonl-field": lambda root, sub: "body",
    "--heldout-fraction": lambda root, sub: "0.3",
    "--top-p": lambda root, sub: "0.5",
    "--temperature": lambda root, sub: "0.5",
    "--lam": lambda root, sub: "0.5",
    "--gamma": lambda root, sub: "0.5",
    "--min-lr-ratio": lambda root, sub: "0.5",
    "--beta1": lambda root, sub: "0.5",
    "--beta2": lambda root, sub: "0.5",
    "--dropout": lambda root, sub: "0.5",
    "--minibatch-size": lambda root, sub: "4",
    "--kv-heads": lambda root, sub: "2",
    "--heads": lambda root, sub: "2",
    "--dim-head": lambda root, sub: "16",
    "--system": lambda root, sub: "Be brief.",
    "--max-new-tokens": lambda root, sub: "7",
    "--dtype": lambda root, sub: "bfloat16",
    "--max-shard-size": lambda root, sub: "500MB",
    "--tokenizer": lambda root, sub: str(root / "bpe"),
    "--ff-inner": lambda root, sub: "100",
    "--layer-types": lambda root, sub: "full,full,full,full",  # the tiny preset's depth 4
    "--rotary-layers": lambda root, sub: "true,false,true,false",
    "--sliding-window": lambda root, sub: "4",  # refused: no sliding layer asks for it
    "--rating-bins": lambda root, sub: "3",
    "--reward-fn": lambda root, sub: "palm_rlhf.arithmetic:exact_match:2",
    "--estimator": lambda root, sub: "rloo",
    "--scale-rewards": lambda root, sub: "none",
    "--loss-type": lambda root, sub: "dapo" if sub == "grpo" else "ipo",
    "--clip": lambda root, sub: "0.3",
    "--label-smoothing": lambda root, sub: "0.1",
}
CONFIGS = (TrainConfig, PaLMConfig, PPOConfig, RewardConfig, GRPOConfig, DPOConfig)


def flag_value(action, root, sub):
    flag = action.option_strings[-1]
    if flag in SPECIAL:
        return [flag, SPECIAL[flag](root, sub)]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, sorted(c for c in action.choices if c != "tiny")[0]]  # tiny: the default
    if action.type is palm_rlhf.cli.options._parse_bool:
        default = next(
            (
                f.default
                for cls in CONFIGS
                for f in dataclasses.fields(cls)
                if f.name == action.dest
            ),
            False,
        )
        return [flag, "false" if default else "true"]
    default = action.default
    if default is None:  # a dataclass field: the field's own default
        default = next(
            f.default
            for cls in CONFIGS
            for f in dataclasses.fields(cls)
            if f.name == action.dest and f.default is not dataclasses.MISSING
        )
    if isinstance(default, bool):
        raise AssertionError(f"{flag}: unexpected bool default")
    if isinstance(default, int):
        return [flag, str(default + 1)]
    if isinstance(default, float):
        return [flag, str(default + 1.0 if default == default else 1.0)]
    raise AssertionError(f"{flag}: add a value to SPECIAL")


def help_flags(sub: str, capsys) -> list[str]:
    with pytest.raises(SystemExit):
        cli.main([sub, "--help"])
    text = capsys.readouterr().out
    return sorted(set(re.findall(r"^\s+(--[a-z0-9-]+)", text, flags=re.M)) - {"--help"})


@pytest.fixture
def recorder(monkeypatch):
    calls: list = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append((name, normalise(args), normalise(kwargs)))
            raise Reached(name)

        return fake

    def fake_accelerator(args, mixed_precision="no"):
        calls.append(("accelerator", args.cpu, getattr(args, "log_with", None), mixed_precision))
        return FakeAccelerator()

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            calls.append((type(self).__name__, normalise(args), normalise(kwargs)))
            self.iteration = 0

        def load(self, directory):
            calls.append(("load", str(directory)))

        def train(self, *args, **kwargs):
            calls.append(("train", normalise(args), normalise(kwargs)))
            raise Reached("train")

    real_forward = RewardModel.forward

    def fake_forward(self, tokens, mask=None, normalized=False, **kwargs):
        calls.append(("reward_forward", normalise(self), tokens.tolist(), normalized))
        raise Reached("score")

    monkeypatch.setattr(palm_rlhf.cli.stages, "make_accelerator", fake_accelerator)
    monkeypatch.setattr(palm_rlhf.cli.rl, "make_accelerator", fake_accelerator)
    monkeypatch.setattr(palm_rlhf.cli.stages, "generate", record("generate"))
    monkeypatch.setattr(palm_rlhf.cli.stages, "train_lm", record("train_lm"))
    monkeypatch.setattr(palm_rlhf.cli.stages, "train_reward", record("train_reward"))
    monkeypatch.setattr(palm_rlhf.cli.rl, "PPOTrainer", type("PPOTrainer", (FakeTrainer,), {}))
    monkeypatch.setattr(palm_rlhf.cli.rl, "GRPOTrainer", type("GRPOTrainer", (FakeTrainer,), {}))
    monkeypatch.setattr(palm_rlhf.cli.rl, "train_dpo", record("train_dpo"))
    monkeypatch.setattr(palm_rlhf.cli.demo, "run_demo", record("run_demo"))
    monkeypatch.setattr(palm_rlhf.model.reward.RewardModel, "forward", fake_forward)
    monkeypatch.setattr(palm_rlhf.cli.label, "sample_tasks", record("sample_tasks"))
    monkeypatch.setattr(palm_rlhf.cli.chat, "ChatSession", record("ChatSession"))
    monkeypatch.setattr(palm_rlhf.cli.hf, "import_hf", record("import_hf"))
    monkeypatch.setattr(palm_rlhf.cli.hf, "export_hf", record("export_hf"))

    def fake_serve(session, host, port, token=None, allowed_hosts=(), announce=print):
        seen = (str(session.log.path), session.per_task, session.target, sorted(session.tasks))
        calls.append(("serve", seen, host, port, list(allowed_hosts)))
        raise Reached("serve")

    monkeypatch.setattr(palm_rlhf.cli.label, "serve_until_done", fake_serve)
    assert real_forward is not fake_forward
    return calls


def run(argv, calls, capsys):
    """('reached', what the recorders saw) or ('refused', stderr)."""
    calls.clear()
    try:
        code = cli.main(argv)
    except Reached:
        return "reached", list(calls)
    err = capsys.readouterr().err
    assert code == 2, f"{argv} neither reached its stage nor failed cleanly ({code}): {err}"
    return "refused", err


# Checked elsewhere because they act only on files a fresh run does not have yet: sample's
# --overwrite (tests/cli/test_cli_label.py refuses an existing --out without it).
NEEDS_EXISTING_OUTPUT = {
    ("sample", "--overwrite"),
    # sample's --out receives the tasks after sampling, where the recorder stops the run;
    # tests/cli/test_cli_label.py reads the tasks back from --out.
    ("sample", "--out"),
    ("import-hf", "--overwrite"),  # tests/hf/test_hf_convert.py
    ("export-hf", "--overwrite"),
}


@pytest.mark.parametrize(
    "sub",
    [
        "pretrain",
        "sft",
        "reward",
        "ppo",
        "grpo",
        "dpo",
        "generate",
        "score",
        "demo",
        "sample",
        "label",
        "chat",
        "import-hf",
        "export-hf",
    ],
)
def test_every_flag_reaches_the_stage_or_is_refused_by_name(sub, files, recorder, capsys):
    parser_actions = {
        action.option_strings[-1]: action
        for action in cli.build_parser()._subparsers._group_actions[0].choices[sub]._actions
        if action.option_strings and action.option_strings[-1] != "--help"
    }
    flags = help_flags(sub, capsys)
    assert flags == sorted(parser_actions), "every parser option is documented in --help"
    base = base_commands(files)[sub]
    outcome, baseline = run(base, recorder, capsys)
    assert outcome == "reached", baseline
    for flag in flags:
        argv = [*base, *flag_value(parser_actions[flag], files, sub)]
        outcome, seen = run(argv, recorder, capsys)
        if outcome == "refused":
            assert flag in seen, f"{sub} {flag}: refused without naming the flag: {seen}"
        elif (sub, flag) not in NEEDS_EXISTING_OUTPUT:
            assert seen != baseline, f"{sub} {flag}: accepted but changed nothing"


def config_readers(module_source: str, cls: type) -> list[str]:
    """Fields of `cls` that a loop never reads as `config.<field>`."""
    # Import lines name modules (`from ..data.preferences`), not config fields.
    module_source = re.sub(r"^\s*(from|import) .*$", "", module_source, flags=re.M)
    return [
        f.name for f in dataclasses.fields(cls) if not re.search(rf"\.{f.name}\b", module_source)
    ]


def test_every_config_field_a_loop_receives_is_read_by_it():
    helpers = inspect.getsource(palm_rlhf.training.step) + inspect.getsource(
        palm_rlhf.training.state
    )
    lm = inspect.getsource(palm_rlhf.training.lm) + helpers
    assert config_readers(lm, TrainConfig) == []
    reward = inspect.getsource(palm_rlhf.training.reward) + helpers
    unread = config_readers(reward, TrainConfig)
    # The fields the reward loop does not use are refused (`NOT_FOR_REWARD`), never ignored.
    # (It reads RewardConfig's lora_rank and lora_alpha, names this text search cannot tell
    # from TrainConfig's LoRA-SFT fields.)
    not_for_reward = set(palm_rlhf.training.reward.NOT_FOR_REWARD)
    assert not_for_reward - {"lora_rank", "lora_alpha"} <= set(unread) <= not_for_reward
    online = inspect.getsource(palm_rlhf.rl.online)  # the engine's sampling fields
    assert config_readers(inspect.getsource(palm_rlhf.rl.ppo) + online, PPOConfig) == []
    assert config_readers(inspect.getsource(palm_rlhf.rl.grpo) + online, GRPOConfig) == []
    assert config_readers(inspect.getsource(palm_rlhf.training.dpo), DPOConfig) == []
    dpo = inspect.getsource(palm_rlhf.training.dpo) + helpers
    # DPO, like the reward loop, takes its data as an argument (its source also says "..data").
    unread = set(config_readers(dpo, TrainConfig)) - {"data"}
    assert not_for_reward - {"lora_rank", "lora_alpha"} <= unread <= not_for_reward
