"""Mining (signature + docstring) -> body pairs with ast."""

from palm_rlhf.data.docstrings import pairs_from_source, stdlib_docstring_pairs

SOURCE = '''\
import os


@decorator
def twice(x):
    """Twice x."""
    y = 2 * x
    return y


class A:
    def method(self):
        """Only a docstring: no body to learn."""

    async def fetch(self, url):
        """Fetch it.

        Long description.
        """
        async with session(url) as r:
            return await r.read()

def undocumented():
    return 1
'''


def test_pairs_keep_the_source_text_decorators_and_indentation():
    pairs = {p.prompt: p.response for p in pairs_from_source(SOURCE)}
    assert pairs == {
        '@decorator\ndef twice(x):\n    """Twice x."""\n': "    y = 2 * x\n    return y\n",
        '    async def fetch(self, url):\n        """Fetch it.\n\n        Long description.\n'
        '        """\n': "        async with session(url) as r:\n"
        "            return await r.read()\n",
    }


def test_responses_are_whole_lines_within_the_limit_and_broken_code_is_skipped():
    [pair] = pairs_from_source(SOURCE, max_response_chars=14)
    assert pair.response == "    y = 2 * x\n"  # "    return y\n" would pass 14 characters
    assert pairs_from_source("def f(:\n") == []
    assert pairs_from_source(SOURCE, max_prompt_chars=20) == []


def test_training_and_heldout_pairs_come_from_different_files():
    train = {p.prompt for p in stdlib_docstring_pairs(100_000, "train")}
    heldout = {p.prompt for p in stdlib_docstring_pairs(100_000, "heldout")}
    assert len(train) > 1000 and len(heldout) > 20
    assert not train & heldout  # identical functions in two files count as held out
    assert stdlib_docstring_pairs(5, "train", seed=1) == stdlib_docstring_pairs(5, "train", 1)
    assert stdlib_docstring_pairs(5, "train", 1) != stdlib_docstring_pairs(5, "train", 2)
