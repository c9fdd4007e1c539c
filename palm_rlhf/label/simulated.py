"""A simulated labeler: a transparent, programmatic rule that ranks Python completions.

It stands in for human raters in the demo: the reward model never sees the rule, only the
rankings it produces, exactly as it would only see human rankings.

The demo's rule (`body_score`) judges a function body written for a signature and docstring the
way a reviewer would, against the body the stdlib really has there:

    score = parses * (0.5 * close + 0.3 * uses_parameters + 0.2 * filled) * (0.25 if trivial)

- parses: 1 when the complete lines parse together as a block, else the share of them that
  parse one by one (`parse_share`, below);
- close: how close the body's tokens (names, numbers, operators) are to the real body's
  opening of the same length (difflib's ratio of the two token sequences);
- uses_parameters: the share of the signature's parameters (not self/cls) the body names (1
  for a function without any);
- filled: complete code up to FILL_CHARS characters, so an empty answer earns nothing there;
- trivial: the body is one statement that says nothing (`return`, `pass`, `...`, `return
  None`/`True`/`False`/`self`, `raise NotImplementedError`): a quarter of the score.

So a constant short line that parses ranks low: it names no parameter, fills little and is
rarely the real body. The earlier rule, the share of lines that parse alone, is kept as
`parse_share`: it rewards any short line that parses, and PPO found that (README, "the exploit
lesson"); `label_samples` still uses it for completions that have no real body to compare with.

`parse_share`: a line "parses" when, with its indentation removed, `ast.parse` accepts it; a
line ending in ":" (a block opener such as `def f(x):` or `for i in y:`) is tried with ` pass`
appended, and a continuation keyword (`else:`, `elif c:`, `except E:`, `finally:`) is tried
inside a minimal `if`/`try` statement. Blank and comment lines are skipped. The last line counts
only if the completion ended it (a trailing newline or eos), so a cut-off line is neither
rewarded nor punished. A completion with no complete line scores 0.

Scores are rounded to `levels` steps before ranking, so completions the rule can barely tell
apart are tied, as a careful human would tie them; ties contribute no training pair.
"""

from __future__ import annotations

import ast
import difflib
import functools
import json
import keyword
import re
import textwrap
import warnings
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
    return parses(text)


def parses(text: str) -> bool:
    """ast.parse accepts the text. Its warnings about what the model wrote (an invalid escape
    such as '\\e' in a string) are not the user's business: silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ast.parse(text)
        except (SyntaxError, ValueError):
            return False
    return True


def complete_lines(completion: str, finished: bool = False) -> list[str]:
    """The completion's complete, non-blank, non-comment lines (the last one only if
    `finished`: it ended with eos)."""
    lines = completion.split("\n")
    if not finished:
        lines = lines[:-1]  # the text after the last newline is an unfinished line
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def parse_share(completion: str, finished: bool = False) -> float:
    """Fraction in [0, 1] of the completion's complete, non-blank, non-comment lines that parse.
    `finished` marks a completion that ended with eos, so its last line counts too."""
    return share_parsing(complete_lines(completion, finished))


def share_parsing(lines: Sequence[str]) -> float:
    """The share of the lines that parse one by one (`line_parses`); 0 for no line."""
    return sum(map(line_parses, lines)) / len(lines) if lines else 0.0


FILL_CHARS = 32
"""Characters of complete code that earn the whole `filled` part of `body_score`."""
TRIVIAL_BODIES = frozenset(
    {"pass", "...", "return", "return None", "return True", "return False", "return self",
     "raise NotImplementedError", "raise NotImplementedError()"}
)  # fmt: skip
TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\S")


def code_tokens(text: str) -> list[str]:
    """Names, numbers and single punctuation characters, in order (strings are not parsed:
    their words count as names, as a reader skimming the code would see them)."""
    return TOKEN.findall(text)


def block_parses(code: str) -> bool:
    """The lines parse together as a block (a statement spread over several lines, which no
    line parses alone), a trailing block opener completed with `pass`."""
    text = textwrap.dedent(code)
    if text.rstrip().endswith(":"):
        text = text.rstrip() + " pass"
    return parses(text)


@functools.lru_cache(maxsize=4096)
def signature_parameters(prompt: str) -> tuple[str, ...]:
    """The parameter names of the function a (decorators +) signature + docstring prompt
    opens, without self and cls; () when it does not parse as one. Cached: a prompt's k
    completions are all scored against it."""
    source = textwrap.dedent(prompt)
    indent = "    "
    try:
        tree = ast.parse(source + indent + "pass\n")
    except (SyntaxError, ValueError):
        return ()
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if not functions:
        return ()
    args = functions[0].args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    return tuple(a.arg for a in every if a.arg not in ("self", "cls"))


def body_score(completion: str, finished: bool, prompt: str, reference: str) -> float:
    """The demo's rule (module docstring): in [0, 1], how a reviewer would rate `completion` as
    the body of the function `prompt` opens, whose real body is `reference`."""
    lines = complete_lines(completion, finished)
    if not lines:
        return 0.0
    code = "\n".join(lines)
    parsed = 1.0 if block_parses(code) else share_parsing(lines)
    tokens = code_tokens(code)
    real = code_tokens(reference)[: max(len(tokens), 1)]
    close = difflib.SequenceMatcher(None, tokens, real, autojunk=False).ratio()
    parameters = signature_parameters(prompt)
    names = {t for t in tokens if t.isidentifier() and not keyword.iskeyword(t)}
    uses = sum(p in names for p in parameters) / len(parameters) if parameters else 1.0
    filled = min(1.0, len(code.strip()) / FILL_CHARS)
    score = parsed * (0.5 * close + 0.3 * uses + 0.2 * filled)
    statements = [line.strip() for line in lines]
    if len(statements) == 1 and statements[0].rstrip(";") in TRIVIAL_BODIES:
        score *= 0.25
    return score


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
    levels: int | None = None,
    lora_scope: str | None = None,
    references: Sequence[str] | None = None,
) -> list[PreferenceGroup]:
    """Sample k completions per prompt from `policy` and rank them with the rule: `body_score`
    against each prompt's real body when `references` (one per prompt) are given, else
    `parse_share`. Scores are rounded to `levels` steps (default: 10 for body_score, whose
    scores are continuous, 4 for parse_share, whose are shares of a few lines). Groups whose
    completions all tie are dropped: they hold no preference."""
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    levels = levels or (4 if references is None else 10)
    rows = [p for p in prompts for _ in range(k)]
    completions = sample_completions(
        policy, tokenizer, rows, max_new_tokens, temperature, seed, batch_size, lora_scope
    )
    groups = []
    for index, prompt in enumerate(prompts):
        chunk = completions[index * k : (index + 1) * k]
        if references is None:
            scores = [parse_share(text, done) for text, done in chunk]
        else:
            scores = [body_score(text, done, prompt, references[index]) for text, done in chunk]
        ranks = rank_completions(scores, levels)
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
