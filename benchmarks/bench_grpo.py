"""Benchmark one GRPO iteration of palm_rlhf against palm-rlhf-pytorch 0.8.0 and TRL 1.12.

One iteration = 16 prompts of 32 tokens (bos + 31 printable ASCII bytes, the same token ids in
all three), a group of G = 8 sampled responses per prompt, each exactly 64 new tokens (temperature
1, eos kept from ending a response), a reward from a cheap Python function (the number of byte
'a', id 97, in the response; no reward model anywhere, so no reward-model cost differs), then the
update: one epoch over the 128 responses in minibatches of 32 (--minibatch sets it for all three).
Each framework runs in its own worker process (peak memories do not mix), on the CPU, in float32,
eager, with torch.set_num_threads(--threads, default 2). The policies are decoders of one size:
dim 128, depth 2, 4 query heads of 32, one key/value head, feed-forward inner 512, vocab 259,
tied embeddings (508,672 parameters; Llama's extra RMSNorms add 256).

* ours -- ``GRPOTrainer(PaLM(cfg), ByteTokenizer(), the 16 prompts, reward_fns=[("count_a",
  fn, 1.0)], config=GRPOConfig(prompts_per_iteration=16, group_size=8, max_new_tokens=64,
  max_prompt_tokens=32, minibatch_size=32, epochs=1, no_eos_penalty=nan, kl_coef=0.04))``; one
  iteration = ``trainer.step()`` (one batched rollout of 16 x 8 with the KV cache, the reward
  function on the decoded responses, the reference log-prob forward in minibatches of 32 (the
  old log-probs are the sampler's, so no second no-gradient forward runs), the reference being
  the base with the adapters off, group-relative advantages, then one epoch
  of 4 minibatch updates with the k3 KL term, each an AdamW step; actor: LoRA rank 8 on a frozen
  base). A forward hook
  sets the policy's eos logit to -1e4 while it decodes, so every response has all 64 tokens like
  the peers' (the mean response length row checks it, from the step's metrics).
* peer -- palm-rlhf-pytorch 0.8.0 ships GRPO as ``palm_rlhf_pytorch.grpo.RLHFTrainer`` (not
  exported at the package top level). ``RLHFTrainer(palm=PaLM(..., flash_attn=True),
  reward_model=CountA(), prompt_token_ids=(16, 32) ids, grpo_num_times_sample_rewards=7,
  minibatch_size=32, epochs=1, kl_div_loss_weight=0.04)``; its reward_model argument must be a
  module called as ``reward_model(sequence, prompt_mask=, mask=)``, so ``CountA`` is a
  parameter-free module returning the count of id 97 in the response positions (what its
  ``RewardModel`` would return, minus the model). One iteration = ``train(num_episodes=1,
  max_timesteps=16, update_timesteps=16, max_seq_len=96, eos_token=None, temperature=1.)``: its
  loop of 16 timesteps, each drawing one prompt at random (with replacement: not every prompt
  once), repeating it G = 7 + 1 = 8 times and calling the actor's generate (no KV cache: every
  new token runs the model over the whole sequence; its default top-k filter keeps the 26 best
  logits; a tqdm bar), then a full actor forward over the 96 tokens (stored full-vocabulary
  probabilities and log-probs), the reward module, and rewards normalised by the group's mean
  and std; after the 16th timestep ``learn`` on the 128 memories: one epoch of minibatches of 32
  (shuffled), each an actor forward, full-vocabulary KL to the *sampling-time* policy (it has no
  reference model and no reference forward), clipped surrogate, entropy bonus, backward and an
  AdoptAtan2 step (actor: LoRA rank 8; a policy-loss print per minibatch).
* trl -- ``trl.GRPOTrainer(model, reward_funcs=[count_a], args, train_dataset, processing_class)``:
  a LlamaForCausalLM policy (SDPA) saved to a temporary folder and loaded back from it (TRL
  builds its reference model from ``config._name_or_path``; the reference is a second, frozen
  full copy), an in-memory WordLevel tokenizer over the 259 ids (``<i>`` words, whitespace
  split), no PEFT (all policy weights train, unlike ours and the peer's LoRA), a Dataset of the
  16 prompts as text, GRPOConfig(per_device_train_batch_size=32, steps_per_generation=4,
  gradient_accumulation_steps=1, num_generations=8, max_completion_length=64,
  generation_kwargs={"min_new_tokens": 64} (keeps eos out, so all 64 tokens), num_iterations=1,
  beta=0.04, use_cpu=True, bf16=False, gradient_checkpointing=False, logging off). In TRL 1.12,
  generation_batch_size = per_device_train_batch_size x processes x steps_per_generation = 128,
  so one generation of 16 prompts x 8 feeds 4 optimizer steps of 32, the same minibatching as
  ours and the peer's; with gradient accumulation 1 < steps_per_generation it also runs its
  old-log-prob forward over the 128 (as ours and the peer do). count_a counts the word ``<97>``
  in each decoded completion. Its ``train()`` loops by itself: a callback at ``on_step_end``
  closes a timed interval every steps_per_generation optimizer steps and blocks until the next,
  so an interval = one generation of 128 (batched, with the KV cache), reward function, old and
  reference log-prob forwards, advantages, 4 minibatch updates, its metric logging.
  ``--minibatch 128`` gives TRL's other layout: one optimizer step per generation.

Metrics: seconds per iteration and samples/s = 128 / seconds (medians of --repeats timed
iterations after --warmup untimed ones); update share = time in ``learn`` / iteration (ours, when
its trainer has a ``learn`` method, and the peer); mean response length (tokens; 64 expected);
peak RSS = the worker's ru_maxrss once built (imports + models) and after the last iteration.
Ratios are ours / other, row by row (below 1 on the seconds row: ours is faster). The workers run
one iteration at a time in turn (the others wait idle on a pipe), so slow phases of a shared
machine hit every column alike; the CPU share of other processes before/during the run is
printed (a busy machine wrecks 2-thread numbers most). Worker output (progress bars, the peer's
loss prints, TRL logs) goes to --log-dir.

Usage: python benchmarks/bench_grpo.py [--only ours,peer,trl] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from bench_model import fmt, machine_info, versus
from peer_workers import Link, keep_eos_out, run_interleaved, serve, timed

FULL = dict(
    num_tokens=259, dim=128, depth=2, heads=4, dim_head=32, prompts=16, group=8, prompt=32, new=64
)
QUICK = dict(
    num_tokens=259, dim=32, depth=1, heads=2, dim_head=16, prompts=4, group=4, prompt=8, new=8
)
MINIBATCH = {"full": 32, "quick": 8}  # quick: 2 minibatches, so TRL's multi-step interval runs
NAMES = {"ours": "ours", "peer": "palm-rlhf-pytorch", "trl": "TRL"}
SHAPE = ("num_tokens", "dim", "depth", "heads", "dim_head")
A, BOS = 97, 257  # the rewarded byte ('a') and ByteTokenizer's bos id


def prompt_ids(c):
    """(prompts, prompt) ids: bos + printable ASCII (valid bytes, never 0: the peer's pad)."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(33, 127, (c["prompts"], c["prompt"]), generator=g)
    ids[:, 0] = BOS
    return ids


def count_a(prompts, responses, **columns):
    return [float(r.count("a")) for r in responses]


def build_ours(c, args, learn_times):

    from palm_rlhf import GRPOConfig, GRPOTrainer, PaLM, PaLMConfig
    from palm_rlhf.tokenizers.base import ByteTokenizer

    tok, n = ByteTokenizer(), c["prompt"] + c["new"]
    cfg = PaLMConfig(**{k: c[k] for k in SHAPE}, max_seq_len=n + 16)
    policy = PaLM(cfg)
    params = sum(p.numel() for p in policy.parameters())
    keep_eos_out(policy, tok.eos_id)
    prompts = [bytes(row[1:].tolist()).decode() for row in prompt_ids(c)]  # + bos = prompt len
    config = GRPOConfig(
        prompts_per_iteration=c["prompts"],
        group_size=c["group"],
        max_new_tokens=c["new"],
        max_prompt_tokens=c["prompt"],
        minibatch_size=args.minibatch,
        epochs=1,
        no_eos_penalty=float("nan"),
        kl_coef=args.kl_coef,
        recompute_old_logprobs=args.recompute_old_logprobs,
    )
    reward_fns = [("count_a", count_a, 1.0)]
    trainer = GRPOTrainer(
        policy, tok, prompts, reward_fns=reward_fns, config=config, show_progress=False
    )
    if hasattr(trainer, "learn"):
        trainer.learn = timed(trainer.learn, learn_times)

    def step():
        m = trainer.step()
        return {"response_len": m.get("response_len") if isinstance(m, dict) else None}

    return params, step


def build_peer(c, args, learn_times):
    import torch
    from palm_rlhf_pytorch import PaLM
    from palm_rlhf_pytorch.grpo import RLHFTrainer

    class CountA(torch.nn.Module):
        """Stands in for RewardModel: the count of id 97 in the response positions."""

        def __init__(self, lengths):
            super().__init__()
            self.lengths = lengths

        def forward(self, x, mask=None, prompt_mask=None):
            response = ~prompt_mask if mask is None else mask & ~prompt_mask
            self.lengths.append(response.sum(-1).float().mean().item())
            return ((x == A) & response).sum(-1).float()

    random.seed(0)  # its prompt draws use the random module
    lengths = []
    palm = PaLM(**{k: c[k] for k in SHAPE}, flash_attn=True)
    params = sum(p.numel() for p in palm.parameters())
    trainer = RLHFTrainer(
        palm=palm,
        reward_model=CountA(lengths),
        prompt_token_ids=prompt_ids(c),
        grpo_num_times_sample_rewards=c["group"] - 1,
        minibatch_size=args.minibatch,
        epochs=1,
        kl_div_loss_weight=args.kl_coef,
    )
    trainer.learn = timed(trainer.learn, learn_times)
    p, n = c["prompts"], c["prompt"] + c["new"]

    def step():  # eos_token=None: every response has the full length
        trainer.train(
            num_episodes=1,
            max_timesteps=p,
            update_timesteps=p,
            max_seq_len=n,
            eos_token=None,
            temperature=1.0,
        )
        out = {"response_len": statistics.mean(lengths) if lengths else None}
        lengths.clear()
        return out

    return params, step


class _Stop(Exception):
    pass


def run_trl(c, args, link):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[k] = "1"  # everything is built here; nothing may be fetched
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers as tf
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer

    logging.set_verbosity_error()
    vocab = {f"<{i}>": i for i in range(256)} | {"<pad>": 256, "<bos>": BOS, "<eos>": 258}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = dict(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=word_level, padding_side="left", **specials)
    d, heads = c["dim"], dict(num_attention_heads=c["heads"], head_dim=c["dim_head"])
    sizes = dict(vocab_size=c["num_tokens"], hidden_size=d, intermediate_size=4 * d)
    ids = dict(bos_token_id=BOS, eos_token_id=258, pad_token_id=tok.pad_token_id)
    rest = dict(num_key_value_heads=1, num_hidden_layers=c["depth"], tie_word_embeddings=True)
    lcfg = tf.LlamaConfig(**sizes, **heads, **ids, **rest, attn_implementation="sdpa")
    work = tempfile.mkdtemp(prefix="bench_grpo_trl_")
    tf.LlamaForCausalLM(lcfg).save_pretrained(Path(work) / "policy")  # TRL loads its reference
    policy = tf.LlamaForCausalLM.from_pretrained(Path(work) / "policy")  # from _name_or_path
    params = sum(p.numel() for p in policy.parameters())
    lengths = []

    def count_a(prompts, completions, completion_ids, **kw):  # TRL's reward-function signature
        lengths.extend(len(x) for x in completion_ids)
        return [float(text.split().count(f"<{A}>")) for text in completions]

    total = c["prompts"] * c["group"]
    steps_per_gen = total // args.minibatch

    class Interval(tf.TrainerCallback):
        def on_step_end(self, cb_args, state, control, **kw):
            if state.global_step % steps_per_gen:
                return
            link.end(response_len=statistics.mean(lengths) if lengths else None)
            lengths.clear()
            if not link.begin():
                raise _Stop

    batches = dict(per_device_train_batch_size=args.minibatch, steps_per_generation=steps_per_gen)
    batches.update(gradient_accumulation_steps=1, num_generations=c["group"], num_iterations=1)
    gen = dict(max_completion_length=c["new"], generation_kwargs={"min_new_tokens": c["new"]})
    gen.update(temperature=1.0, top_k=0, top_p=1.0)
    off = dict(bf16=False, gradient_checkpointing=False, use_cpu=True, beta=args.kl_coef)
    quiet = dict(report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
    quiet.update(output_dir=str(Path(work) / "out"), seed=0, max_steps=steps_per_gen * 99999)
    config = GRPOConfig(**batches, **gen, **off, **quiet)
    assert config.generation_batch_size == total, (config.generation_batch_size, total)
    assert not (config.bf16 or config.gradient_checkpointing), "TRL defaults left on"
    words = {i: w for w, i in vocab.items()}
    prompts = [" ".join(words[i] for i in row) for row in prompt_ids(c).tolist()]
    data = Dataset.from_dict({"prompt": prompts})
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[count_a],
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Interval()],
    )
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
    return ["--threads", str(args.threads), "--minibatch", str(args.minibatch),
            "--kl-coef", str(args.kl_coef)] + (["--quick"] if args.quick else []) + (
            ["--recompute-old-logprobs"] if args.recompute_old_logprobs else [])  # fmt: skip


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(s, c):
    runs = s["runs"]
    dt = statistics.median(r["dt"] for r in runs)
    shares = [r["learn_s"] / r["dt"] for r in runs if r.get("learn_s") is not None]
    return {
        "params": s["params"],
        "s_per_iter": dt,
        "samples_s": c["prompts"] * c["group"] / dt,
        "learn_share": statistics.median(shares) if shares else None,
        "response_len": median_of(runs, "response_len"),
        "setup_rss_mb": s["setup_rss_mb"],
        "peak_rss_mb": s["peak_rss_mb"],
    }


def print_table(results, c):
    shape = f"{c['prompts']} x G={c['group']}, {c['prompt']}+{c['new']} tokens"
    rows = [
        ("params", "policy parameters"),
        ("s_per_iter", f"s per iteration ({shape})"),
        ("samples_s", "samples (responses)/s"),
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
    p.add_argument("--minibatch", type=int, help="responses per optimizer step (default 32)")
    p.add_argument("--kl-coef", type=float, default=0.04, help="KL weight (beta) for all three")
    p.add_argument("--quick", action="store_true", help="tiny model and lengths: smoke check")
    p.add_argument(
        "--recompute-old-logprobs",
        action="store_true",
        help="ours: a forward pass for the old log-probs instead of the sampler's",
    )
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
    total = c["prompts"] * c["group"]
    args.minibatch = min(args.minibatch or MINIBATCH["quick" if args.quick else "full"], total)
    if total % args.minibatch:
        p.error(f"--minibatch must divide {total} (prompts x group): TRL needs whole steps")
    args.train_threads = args.gen_threads = args.threads  # for bench_model.machine_info
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_grpo_")
    os.makedirs(log_dir, exist_ok=True)
    info = machine_info(args)
    print("## machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()))
    print(f"\nconfig: {c}, minibatch={args.minibatch}, kl_coef={args.kl_coef}, ", end="")
    print(f"warmup={args.warmup}, repeats={args.repeats}, worker logs: {log_dir}\n", flush=True)

    samples, notes = run_interleaved(__file__, keys, NAMES, worker_flags(args), args, log_dir, info)

    results = {k: summarize(s, c) for k, s in samples.items() if s["runs"]}
    for k, s in samples.items():
        if dts := [r["dt"] for r in s["runs"]]:
            print(f"{NAMES[k]}: s per iteration min..max {fmt(min(dts))}..{fmt(max(dts))}")
    for k, r in results.items():
        if r["response_len"] is not None and abs(r["response_len"] - c["new"]) > 1e-6:
            notes.append(f"{NAMES[k]}: mean response length {r['response_len']}, not {c['new']}")
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
