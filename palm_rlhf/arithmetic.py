"""A verifiable task generated in code: multi-digit addition, with an exact-match reward.

Prompts read "347+85=" and the answer is the sum's digits, "432"; nothing is downloaded. The
held-out split is by problem: `addition_problems(..., split="test")` never returns a problem
that `split="train"` can (the two are separated by a hash of the operands), so an accuracy on
the test split measures generalisation, not recall.

`exact_match` is a reward function in the form `GRPOTrainer` and `palm-rlhf grpo --reward-fn
palm_rlhf.arithmetic:exact_match` call: it reads the `answer` field of each prompt's JSONL row.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from .data.prompts import PromptRecord


def _split_of(a: int, b: int) -> str:
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return "test" if digest[0] < 26 else "train"  # ~10% of problems are test problems


def addition_problems(
    count: int, digits: int = 3, split: str = "train", seed: int = 0
) -> list[PromptRecord]:
    """`count` problems a+b with a, b of 1..digits digits (uniform in the number of digits, so
    short operands are not swamped by long ones), from one split: {"answer": str(a + b)}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if digits < 1 or count < 1:
        raise ValueError(f"digits and count must be >= 1, got {digits} and {count}")
    rng = random.Random(f"{seed}-{split}-{digits}")
    out: list[PromptRecord] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(count * 1000):
        if len(out) == count:
            break
        a, b = (rng.randrange(10 ** (rng.randint(1, digits))) for _ in range(2))
        if (a, b) in seen or _split_of(a, b) != split:
            continue
        seen.add((a, b))
        out.append(PromptRecord(f"{a}+{b}=", {"answer": str(a + b)}))
    if len(out) < count:
        raise ValueError(f"only {len(out)} distinct {split} problems of {digits} digits exist")
    return out


def exact_match(
    prompts: Sequence[str], responses: Sequence[str], answer: Sequence[str], **fields: object
) -> list[float]:
    """1.0 where the response is exactly the answer (surrounding whitespace ignored), else 0."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer, strict=True)]


def sloppy_answer(problem: PromptRecord, rng: random.Random, error_rate: float) -> str:
    """A demonstrator that is right only 1 - error_rate of the time: otherwise it answers one
    more than the sum, the systematic flaw SFT then imitates and a verifier can remove."""
    answer = int(problem.fields["answer"])
    return str(answer + 1 if rng.random() < error_rate else answer)


def write_sft_pairs(
    path: str | Path, problems: Sequence[PromptRecord], error_rate: float = 0.0, seed: int = 0
) -> Path:
    """The problems with a demonstrator's answers as SFT JSONL rows {"prompt", "response"};
    with error_rate > 0 that share of the answers is off by one (`sloppy_answer`)."""
    if not 0 <= error_rate <= 1:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    rng, path = random.Random(seed), Path(path)
    with open(path, "w") as handle:
        for problem in problems:
            row = {"prompt": problem.prompt, "response": sloppy_answer(problem, rng, error_rate)}
            handle.write(json.dumps(row) + "\n")
    return path


def write_prompts(path: str | Path, problems: Sequence[PromptRecord]) -> Path:
    """The problems as a prompts JSONL ({"prompt", "answer"}) for `palm-rlhf grpo`."""
    path = Path(path)
    with open(path, "w") as handle:
        for problem in problems:
            handle.write(json.dumps({"prompt": problem.prompt, **problem.fields}) + "\n")
    return path
