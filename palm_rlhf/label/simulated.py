"""A simulated labeler: a transparent, programmatic rule that ranks Python completions.

It stands in for human raters in the demo: the reward model never sees the rule, only the
rankings it produces, exactly as it would only see human rankings.

The rule scores a completion by how much of it reads as Python, line by line:

    score = (number of complete lines that parse as Python) / (number of complete lines)

A line "parses" when, with its indentation removed, `ast.parse` accepts it; a line ending in
":" (a block opener such as `def f(x):` or `for i in y:`) is tried with ` pass` appended, and
a continuation keyword (`else:`, `elif c:`, `except E:`, `finally:`) is tried inside a minimal
`if`/`try` statement. Blank and comment lines are skipped. The last line counts only if the
completion ended it (a trailing newline or eos), so a cut-off line is neither rewarded nor
punished. A completion with no complete line scores 0.

Scores are rounded to `levels` steps before ranking, so completions the rule can barely tell
apart are tied, as a careful human would tie them; ties contribute no training pair.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.preferences import PreferenceGroup
from ..generation import generate
from ..model.palm import PaLM
from ..progress import progress_kwargs
from ..storage.atomic import write_bytes_atomic
from ..tokenizers.base import Tokenizer, encode_prompt, stop_ids

CONTINUATIONS = {
    "else": "if x:\n pass\n{}",
    "elif": "if x:\n pass\n{}",
    "except": "try:\n pass\n{}",
    "finally": "try:\n pass\n{}",
}


def line_parses(line: str) -> bool:
    text = line.strip()
    if text.endswith(":"):
        text += " pass"
    keyword = text.split(maxsplit=1)[0].rstrip(":") if text else ""
    if keyword in CONTINUATIONS:
        text = CONTINUATIONS[keyword].format(text)
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def rule_score(completion: str, finished: bool = False) -> float:
    """Fraction in [0, 1] of the completion's complete, non-blank, non-comment lines that parse.
    `finished` marks a completion that ended with eos, so its last line counts too."""
    lines = completion.split("\n")
    if not finished:
        lines = lines[:-1]  # the text after the last newline is an unfinished line
    lines = [line for line in lines if line.strip() and not line.strip().startswith("#")]
    if not lines:
        return 0.0
    return sum(line_parses(line) for line in lines) / len(lines)


def rank_completions(scores: Sequence[float], levels: int = 4) -> list[int]:
    """Ranks (0 = best, ties share a rank) after rounding scores to `levels` steps."""
    rounded = [round(s * levels) for s in scores]
    order = sorted(set(rounded), reverse=True)
    return [order.index(r) for r in rounded]


@torch.no_grad()
def sample_completions(
    policy: PaLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    lora_scope: str | None = None,
    show_progress: bool = False,
    top_p: float | None = None,
) -> list[tuple[str, bool]]:
    """One sampled completion per prompt: (text, finished), finished = it ended with a stop id
    (eos, or a chat model's end-of-turn token)."""
    completions: list[tuple[str, bool]] = []
    stops = stop_ids(tokenizer)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="sample", unit="batch", **progress_kwargs(show_progress)):
        batch = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        out = generate(
            policy,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_id=stops,
            pad_id=tokenizer.pad_id,
            seed=seed + start,
            lora_scope=lora_scope,
        )
        for tokens, mask in zip(out.tokens, out.mask, strict=True):
            real = tokens[mask]
            finished = bool(len(real)) and int(real[-1]) in stops
            completions.append((tokenizer.decode(real), finished))
    return completions


@torch.no_grad()
def label_samples(
    policy: PaLM,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    k: int = 4,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    levels: int = 4,
    lora_scope: str | None = None,
) -> list[PreferenceGroup]:
    """Sample k completions per prompt from `policy` and rank them with the rule. Groups whose
    completions all tie are dropped: they hold no preference."""
    rows = [p for p in prompts for _ in range(k)]
    completions = sample_completions(
        policy, tokenizer, rows, max_new_tokens, temperature, seed, batch_size, lora_scope
    )
    groups = []
    for index, prompt in enumerate(prompts):
        chunk = completions[index * k : (index + 1) * k]
        ranks = rank_completions([rule_score(text, done) for text, done in chunk], levels)
        if len(set(ranks)) > 1:
            groups.append(PreferenceGroup(prompt, [text for text, _ in chunk], ranks))
    return groups


def write_rankings(groups: Sequence[PreferenceGroup], path: str | Path) -> None:
    """Save groups as the documented rankings JSONL ({"prompt", "responses", "ranking"})."""
    lines = []
    for group in groups:
        order = sorted(set(group.ranks))
        ranking = [[i for i, r in enumerate(group.ranks) if r == rank] for rank in order]
        ranking = [tied[0] if len(tied) == 1 else tied for tied in ranking]
        record = {"prompt": group.prompt, "responses": group.responses, "ranking": ranking}
        lines.append(json.dumps(record))
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
