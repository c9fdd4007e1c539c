"""The simulated labeler's rules: what a constant short answer gets, against a real body."""

import pytest

from palm_rlhf.data.docstrings import stdlib_docstring_pairs
from palm_rlhf.label.simulated import (
    TRIVIAL_BODIES,
    body_score,
    label_samples,
    parse_share,
    rank_completions,
    signature_parameters,
)

PROMPT = 'def clamp(value, low, high):\n    """Limit value to [low, high]."""\n'
REAL = "    if value < low:\n        return low\n    return min(value, high)\n"


def test_signature_parameters_skip_self_and_read_every_kind():
    method = '    @staticmethod\n    def f(self, a, /, b=1, *args, c, **kw):\n        """Doc."""\n'
    assert signature_parameters(method) == ("a", "b", "c", "args", "kw")
    assert signature_parameters('def g(self):\n    """Doc."""\n') == ()
    assert signature_parameters("not a signature (\n") == ()


@pytest.mark.parametrize("trivial", sorted(TRIVIAL_BODIES))
def test_a_constant_short_line_that_parses_ranks_low(trivial):
    # The exploit PPO found under the old rule: any one short line that parses scored 1.
    assert parse_share(trivial + "\n") == 1.0
    assert body_score(trivial + "\n", False, PROMPT, REAL) < 0.05


def test_the_real_body_ranks_first_then_a_plausible_one_then_noise():
    real = body_score(REAL, False, PROMPT, REAL)
    plausible = body_score("    return max(low, min(value, high))\n", False, PROMPT, REAL)
    ignores_parameters = body_score("    x = compute()\n    return x\n", False, PROMPT, REAL)
    noise = body_score("    ret )( value lo\n", False, PROMPT, REAL)
    assert real == pytest.approx(1.0)
    assert real > plausible > ignores_parameters > noise == 0.0
    # Ranked as the labeler ranks: best first, distinct levels.
    assert rank_completions([noise, real, plausible, ignores_parameters], 10) == [3, 0, 1, 2]


def test_an_unfinished_last_line_counts_only_once_finished():
    cut = "    if value < low:\n        return lo"
    assert body_score(cut, False, PROMPT, REAL) < body_score(cut + "w\n", False, PROMPT, REAL)
    assert body_score("    return", False, PROMPT, REAL) == 0.0  # no complete line


def test_real_stdlib_bodies_beat_a_trivial_answer_on_held_out_prompts():
    # A real body cut at 160 characters may end inside a statement that spans lines, so a
    # few score lower (1 of these 40 scores 0: an open `try:` whose call is cut mid-argument).
    pairs = stdlib_docstring_pairs(40, "heldout", seed=0)
    real = [body_score(p.response, False, p.prompt, p.response) for p in pairs]
    trivial = [body_score("    return\n", False, p.prompt, p.response) for p in pairs]
    assert sorted(real)[len(real) // 2] > 0.9
    beaten = sum(r > 3 * t for r, t in zip(real, trivial, strict=True))
    assert beaten >= 0.95 * len(pairs), (real, trivial)


def test_label_samples_needs_one_reference_per_prompt():
    with pytest.raises(ValueError, match="2 references for 3 prompts"):
        label_samples(None, None, ["a", "b", "c"], references=["x", "y"])
