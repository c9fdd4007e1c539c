"""Benchmark one PPO iteration of palm_rlhf against palm-rlhf-pytorch 0.8.0 and TRL 1.12.

One iteration = 16 prompts of 32 tokens, one sampled response of exactly 112 new tokens each
(temperature 1), scores from a reward model, then the PPO update (default 1 epoch over one
minibatch of 16, the peer's defaults; --ppo-epochs / --minibatch set it for all three alike).
Each framework runs in its own worker process (peak memories do not mix), on the CPU, in float32,
eager, with torch.set_num_threads(--threads, default 2). Policy, reward model and critic are
decoders of one size: dim 128, depth 2, 4 query heads of 32, one key/value head, feed-forward
inner 512, vocab 259, tied embeddings (508,672 parameters; Llama's extra RMSNorms add 256).

* ours -- ``PPOTrainer(PaLM(cfg), ByteTokenizer(), 64 prompts of 31 ASCII bytes (+ bos = 32
  tokens), RewardModel(PaLM(cfg)), config=PPOConfig(rollout_batch_size=16, minibatch_size=16,
  max_new_tokens=112, max_prompt_tokens=32, ppo_epochs=1, no_eos_penalty=nan))``; one iteration
  = ``trainer.step()`` (one batched rollout with the KV cache; actor and critic: LoRA rank 8). A
  forward hook sets the policy's eos logit to -1e4, so every response has all 112 tokens like the
  peers' (the mean response length row checks it).
* peer -- ``RLHFTrainer(palm=PaLM(..., flash_attn=True), reward_model=RewardModel(palm),
  prompt_token_ids=(64, 32) ids, minibatch_size=16, epochs=1)``; one iteration =
  ``train(num_episodes=1, max_timesteps=16, update_timesteps=16, max_seq_len=144)`` with
  eos_token=None: its loop of 16 one-prompt rollouts (generate without a KV cache, default top-k
  filter), each followed by actor + critic and reward-model forwards, then ``learn`` on the 16
  memories (actor, critic and reward model: LoRA rank 8).
* trl -- ``trl.experimental.ppo.PPOTrainer(config, tokenizer, policy, None, reward, data,
  value)``: LlamaForCausalLM policy (SDPA), LlamaForSequenceClassification value and reward
  models, an in-memory WordLevel tokenizer over the 259 ids, no PEFT (all policy and value
  weights train, a full reference copy), PPOConfig(per_device_train_batch_size=16,
  num_mini_batches=1, num_ppo_epochs=1, response_length=112, local_rollout_forward_batch_size=16,
  stop_token=None, missing_eos_penalty=None, num_sample_generations=0, use_cpu=True, bf16=False,
  gradient_checkpointing=False; TRL's PPO defaults are bf16 and checkpointing on). Its
  ``train()`` loops by itself: a callback at ``on_step_end`` closes each timed interval and
  blocks until the next, so an interval = one pass of its loop (batched generation with the KV
  cache, reference/value/reward forwards, GAE, update, logging, cleanup).

Metrics: seconds per iteration and prompts/s = 16 / seconds (medians of --repeats timed
iterations after --warmup untimed ones); update share = time in ``learn`` / iteration (ours and
peer); peak RSS = the worker's ru_maxrss once built (imports + models) and after the last
iteration. Ratios are ours / other, row by row. The workers run one iteration at a time in turn
(the others wait idle on a pipe), so slow phases of a shared machine hit every column alike; the
CPU share of other processes before/during the run is printed (a busy machine wrecks 2-thread
numbers most). Worker output (progress bars, the peer's loss prints, TRL logs) goes to --log-dir.

Usage: python benchmarks/bench_ppo.py [--only ours,peer,trl] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile

from bench_model import fmt, machine_info, versus
from peer_workers import Link, keep_eos_out, run_interleaved, serve, timed

FULL = dict(num_tokens=259, dim=128, depth=2, heads=4, dim_head=32, batch=16, prompt=32, new=112)
QUICK = dict(num_tokens=259, dim=32, depth=1, heads=2, dim_head=16, batch=4, prompt=8, new=8)
NAMES = {"ours": "ours", "peer": "palm-rlhf-pytorch", "trl": "TRL"}
SHAPE = ("num_tokens", "dim", "depth", "heads", "dim_head")


def prompt_ids(c):
    import torch

    g = torch.Generator().manual_seed(1)  # printable ASCII: valid bytes, never 0 (peer's pad)
    return torch.randint(33, 127, (64, c["prompt"]), generator=g)


def build_ours(c, args, learn_times):

    from palm_rlhf import PaLM, PaLMConfig
    from palm_rlhf.model.reward import RewardModel
    from palm_rlhf.rl.config import PPOConfig
    from palm_rlhf.rl.ppo import PPOTrainer
    from palm_rlhf.tokenizers.base import ByteTokenizer

    tok, n = ByteTokenizer(), c["prompt"] + c["new"]
    cfg = PaLMConfig(**{k: c[k] for k in SHAPE}, max_seq_len=n + 16)
    policy, reward = PaLM(cfg), RewardModel(PaLM(cfg))
    params = sum(p.numel() for p in policy.parameters())
    keep_eos_out(policy, tok.eos_id)
    prompts = [bytes(row[1:].tolist()).decode() for row in prompt_ids(c)]  # + bos = prompt len
    sizes = dict(rollout_batch_size=c["batch"], minibatch_size=args.minibatch)
    lengths = dict(max_new_tokens=c["new"], max_prompt_tokens=c["prompt"])
    config = PPOConfig(**sizes, **lengths, ppo_epochs=args.ppo_epochs, no_eos_penalty=float("nan"))
    trainer = PPOTrainer(policy, tok, prompts, reward, config=config, show_progress=False)
    trainer.learn = timed(trainer.learn, learn_times)
    return params, lambda: {"response_len": trainer.step()["response_len"]}


def build_peer(c, args, learn_times):
    from palm_rlhf_pytorch import PaLM, RewardModel, RLHFTrainer

    palm = PaLM(**{k: c[k] for k in SHAPE}, flash_attn=True)
    params = sum(p.numel() for p in palm.parameters())
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=RewardModel(palm),
        prompt_token_ids=prompt_ids(c),
        minibatch_size=args.minibatch,
        epochs=args.ppo_epochs,
    )
    trainer.learn = timed(trainer.learn, learn_times)
    b, n = c["batch"], c["prompt"] + c["new"]

    def step():  # eos_token=None (its default): every response has the full length
        trainer.train(num_episodes=1, max_timesteps=b, update_timesteps=b, max_seq_len=n)
        return {"response_len": float(c["new"])}

    return params, step


class _Stop(Exception):
    pass


def run_trl(c, args, link):
    import transformers as tf
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers.utils import logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    logging.set_verbosity_error()
    vocab = {f"<{i}>": i for i in range(256)} | {"<pad>": 256, "<bos>": 257, "<eos>": 258}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    specials = dict(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=word_level, padding_side="left", **specials)
    d, heads = c["dim"], dict(num_attention_heads=c["heads"], head_dim=c["dim_head"])
    sizes = dict(vocab_size=c["num_tokens"], hidden_size=d, intermediate_size=4 * d)
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=tok.pad_token_id)
    rest = dict(num_key_value_heads=1, num_hidden_layers=c["depth"], tie_word_embeddings=True)
    lcfg = tf.LlamaConfig(**sizes, **heads, **ids, **rest, num_labels=1, attn_implementation="sdpa")
    policy = tf.LlamaForCausalLM(lcfg)
    value, reward = tf.LlamaForSequenceClassification(lcfg), tf.LlamaForSequenceClassification(lcfg)
    params = sum(p.numel() for p in policy.parameters())

    class Interval(tf.TrainerCallback):
        def on_step_end(self, *a, **kw):
            link.end(response_len=float(c["new"]))  # stop_token=None: always the full length
            if not link.begin():
                raise _Stop

    b, mb = c["batch"], args.minibatch
    batches = dict(per_device_train_batch_size=b, num_mini_batches=b // mb, total_episodes=b * 9999)
    lengths = dict(response_length=c["new"], local_rollout_forward_batch_size=b)
    off = dict(stop_token=None, missing_eos_penalty=None, num_sample_generations=0, bf16=False)
    quiet = dict(report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    off.update(gradient_checkpointing=False, output_dir=tempfile.mkdtemp(prefix="bench_ppo_"))
    config = PPOConfig(num_ppo_epochs=args.ppo_epochs, **batches, **lengths, **off, **quiet)
    data = Dataset.from_dict({"input_ids": prompt_ids(c).tolist()})
    trainer = PPOTrainer(config, tok, policy, None, reward, data, value, callbacks=[Interval()])
    link.send(params=params)
    if link.begin():
        with contextlib.suppress(_Stop):
            trainer.train()


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, link = QUICK if args.quick else FULL, Link(args.fd)
    if args.worker == "trl":
        return run_trl(c, args, link)
    return serve(link, {"ours": build_ours, "peer": build_peer}[args.worker], c, args)


def worker_flags(args):
    """The parent's settings, passed on to every worker."""
    return ["--threads", str(args.threads), "--ppo-epochs", str(args.ppo_epochs),
            "--minibatch", str(args.minibatch)] + (["--quick"] if args.quick else [])  # fmt: skip


def summarize(s, c):
    runs = s["runs"]
    dt = statistics.median(r["dt"] for r in runs)
    shares = [r["learn_s"] / r["dt"] for r in runs if r.get("learn_s") is not None]
    return {
        "params": s["params"],
        "s_per_iter": dt,
        "prompts_s": c["batch"] / dt,
        "learn_share": statistics.median(shares) if shares else None,
        "response_len": statistics.median(r["response_len"] for r in runs),
        "setup_rss_mb": s["setup_rss_mb"],
        "peak_rss_mb": s["peak_rss_mb"],
    }


def print_table(results, c):
    rows = [
        ("params", "policy parameters"),
        ("s_per_iter", f"s per iteration ({c['batch']} x {c['prompt']}+{c['new']} tokens)"),
        ("prompts_s", "prompts/s"),
        ("learn_share", "share of the iteration in the update"),
        ("response_len", "mean response length (tokens)"),
        ("setup_rss_mb", "peak RSS once built, MB"),
        ("peak_rss_mb", "peak RSS after the run, MB"),
    ]
    header = ["metric", *NAMES.values(), f"ours vs {NAMES['peer']}", f"ours vs {NAMES['trl']}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for key, label in rows:
        vals = [results.get(k, {}).get(key) for k in NAMES]
        ratios = [versus(key, vals[0], v) for v in vals[1:]]
        print("| " + " | ".join([label] + [fmt(v) for v in vals] + ratios) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="ours,peer,trl", help="comma list of ours,peer,trl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--minibatch", type=int, default=16, help="responses per optimizer step")
    p.add_argument("--quick", action="store_true", help="tiny model and lengths: smoke check")
    p.add_argument("--json", help="also write the results to this path")
    p.add_argument("--log-dir", help="worker logs (default: a new temporary folder)")
    p.add_argument("--worker", choices=list(NAMES), help=argparse.SUPPRESS)
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    if set(keys) - set(NAMES):
        p.error(f"unknown --only entries: {sorted(set(keys) - set(NAMES))}")
    c = QUICK if args.quick else FULL
    args.minibatch = min(args.minibatch, c["batch"])
    args.train_threads = args.gen_threads = args.threads  # for bench_model.machine_info
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_ppo_")
    os.makedirs(log_dir, exist_ok=True)
    info = machine_info(args)
    print("## machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()))
    print(f"\nconfig: {c}, ppo_epochs={args.ppo_epochs}, minibatch={args.minibatch}, ", end="")
    print(f"warmup={args.warmup}, repeats={args.repeats}, worker logs: {log_dir}\n", flush=True)

    samples, notes = run_interleaved(__file__, keys, NAMES, worker_flags(args), args, log_dir, info)

    results = {k: summarize(s, c) for k, s in samples.items() if s["runs"]}
    for k, s in samples.items():
        if dts := [r["dt"] for r in s["runs"]]:
            print(f"{NAMES[k]}: s per iteration min..max {fmt(min(dts))}..{fmt(max(dts))}")
    for when in ("before", "during"):
        busy = info[f"others_cpu_{when}"]
        if busy is not None and busy > 0.05:
            notes.append(f"other processes used {busy:.0%} of the CPUs {when} the run: noisy")
    print()
    print_table(results, c)
    print(f"\nother processes' CPU share before / during: {info['others_cpu_before']} / ", end="")
    print(info["others_cpu_during"])
    for n in notes:
        print(f"NOTE: {n}")
    if args.json:
        with open(args.json, "w") as f:
            out = {"machine": info, "config": c, "args": vars(args), "results": results}
            json.dump({**out, "samples": samples, "notes": notes}, f, indent=2)


if __name__ == "__main__":
    main()
