"""The ranking page in a real browser (Playwright driving the system Chromium).

Locally these tests skip when Playwright or Chromium is missing; `.ci/run` installs both and
sets PALM_RLHF_REQUIRE_BROWSER=1, which turns the skip into a failure.
PALM_RLHF_SCREENSHOT=path saves the README's screenshot there.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from palm_rlhf.label.log import RankingLog, Submission
from palm_rlhf.label.server import LabelServer
from palm_rlhf.label.session import LabelSession, display_order
from palm_rlhf.label.tasks import Task

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

missing = (
    "Playwright is not installed (pip install playwright)"
    if sync_playwright is None
    else "no system Chromium (apt-get install chromium)"
    if CHROMIUM is None
    else None
)
if missing and os.environ.get("PALM_RLHF_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"browser tests are required here, but {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=str(missing))

HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
TASKS = [
    Task("t0", "def add(a, b):\n", ["    return a + b\n", "    return a - b\n",
         "    pass\n", HOSTILE], [True] * 4),
    Task("t1", "import os\n", ["print(os.sep)\n", "os.", "x = (\n", "for f in os.listdir():\n"],
         [True] * 4),
    Task("t2", "class A:\n", ["    x = 1\n", "    def f(self):\n" * 30, "  ):", "    pass\n"],
         [True] * 4),
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def served(tmp_path):
    def start(per_task=1):
        log = RankingLog(tmp_path / "r.jsonl")
        server = LabelServer(LabelSession(TASKS, log, per_task), port=0, token="tok")
        server.serve_in_thread()
        started.append((server, log))
        return server

    started = []
    yield start
    for server, log in started:
        server.shutdown()
        server.server_close()
        log.close()


def rows(server):
    text = server.session.log.path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def open_page(browser, server, name, **context):
    page = browser.new_context(viewport={"width": 1000, "height": 900}, **context).new_page()
    page.goto(server.url())
    assert page.url == server.url(with_token=False)  # the token left the address bar
    page.fill("#name-input", name)
    page.click("#name-save")
    page.wait_for_selector("#ranks .card")
    assert not page.is_visible("#name-form") and page.text_content("#who-name") == name
    return page


def card_order(page):
    """Response ids as the page shows them, best first, ties as lists."""
    tiers = page.eval_on_selector_all(
        "#ranks .rank",
        "rs => rs.map(r => [...r.querySelectorAll('.card')].map(c => +c.dataset.id))",
    )
    return [t[0] if len(t) == 1 else sorted(t) for t in tiers]


def wait_rows(page, server, count):
    page.wait_for_function(
        "n => document.querySelector('#progress').textContent.startsWith('You: ' + n)",
        arg=count,
    )
    assert len([r for r in rows(server) if "retracts" not in r]) >= count


def test_keyboard_only_ranking_untouched_warning_and_reload(browser, served):
    server = served()
    page = open_page(browser, server, "ana")
    order = display_order("t0", "ana", 4)
    assert card_order(page) == order
    page.keyboard.press("Enter")  # untouched: a warning, nothing written
    assert page.is_visible("#warning") and rows(server) == []
    focused = int(page.evaluate("document.activeElement.dataset.id"))
    assert focused == order[0]
    page.keyboard.press("4")  # first card to rank 4
    page.keyboard.press("ArrowUp")  # then one up, to rank 3
    expected = [order[1], order[2], order[0], order[3]]
    assert card_order(page) == expected
    page.keyboard.press("Enter")
    wait_rows(page, server, 1)
    [row] = rows(server)
    assert row["ranking"] == expected and row["labeler"] == "ana" and row["task_id"] == "t0"
    assert row["display_order"] == order and row["duration_s"] > 0
    page.reload()
    page.wait_for_selector("#ranks .card")
    assert page.text_content("#prompt") == "import os\n"  # the next task, not t0 again


def drag(page, source, target):
    box = page.locator(source).bounding_box()
    goal = page.locator(target).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(goal["x"] + 30, goal["y"] + goal["height"] / 2, steps=8)
    page.mouse.up()


def test_drag_makes_a_tie_and_undo_brings_the_task_back(browser, served):
    server = served()
    page = open_page(browser, server, "bo")
    order = display_order("t0", "bo", 4)
    drag(page, f'.card[data-id="{order[1]}"] .handle', '.rank[data-rank="0"]')
    assert card_order(page) == [sorted(order[:2]), order[2], order[3]]
    drag(page, f'.card[data-id="{order[3]}"] .handle', '.gap[data-gap="0"]')  # above all
    assert card_order(page) == [order[3], sorted(order[:2]), order[2]]
    page.check(f'.card[data-id="{order[2]}"] input[data-flag="broken"]')
    page.click("#submit")
    wait_rows(page, server, 1)
    [row] = rows(server)
    assert row["ranking"] == [order[3], sorted(order[:2]), order[2]]
    assert row["flags"][order[2]] == ["broken"]
    page.click("#undo")
    page.wait_for_function(
        "() => document.querySelector('#prompt').textContent.startsWith('def add')"
    )
    assert rows(server)[-1]["retracts"] == row["submission_id"]
    page.click("#not-rankable")
    wait_rows(page, server, 1)
    assert rows(server)[-1]["not_rankable"] is True and rows(server)[-1]["ranking"] == []


def test_a_touch_drag_ranks_like_a_mouse_drag(browser, served):
    server = served()
    page = open_page(browser, server, "dee", has_touch=True)
    order = display_order("t0", "dee", 4)
    cdp = page.context.new_cdp_session(page)
    box = page.locator(f'.card[data-id="{order[2]}"] .handle').bounding_box()
    goal = page.locator('.rank[data-rank="0"]').bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 9):
        point = {"x": x + (goal["x"] + 30 - x) * step / 8,
                 "y": y + (goal["y"] + goal["height"] / 2 - y) * step / 8}  # fmt: skip
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert card_order(page) == [sorted([order[0], order[2]]), order[1], order[3]]


def test_model_output_is_shown_as_text_and_runs_nothing(browser, served, tmp_path):
    server = served()
    page = open_page(browser, server, "cy")
    texts = page.eval_on_selector_all("#ranks .response-text", "ps => ps.map(p => p.textContent)")
    assert HOSTILE in texts
    assert page.evaluate("window.pwned") is None
    assert (
        page.query_selector("#ranks img") is None and page.query_selector("#ranks script") is None
    )
    second = display_order("t0", "cy", 4)[1]
    page.focus(f'.card[data-id="{second}"]')
    page.keyboard.press("t")  # a tie, for the screenshot
    assert len(card_order(page)) == 3
    shot = Path(os.environ.get("PALM_RLHF_SCREENSHOT", tmp_path / "label_page.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_labelers_share_each_task_with_per_task_2(browser, served):
    server = served(per_task=2)
    ana, bo = open_page(browser, server, "ana"), open_page(browser, server, "bo")
    for page in (ana, bo):
        assert page.text_content("#prompt") == "def add(a, b):\n"
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        wait_rows(page, server, 1)
        assert page.text_content("#prompt") == "import os\n"
    assert {(r["labeler"], r["task_id"]) for r in rows(server)} == {("ana", "t0"), ("bo", "t0")}
    assert all(r["display_order"] == display_order("t0", r["labeler"], 4) for r in rows(server))
    assert server.session.progress()["overall_done"] == 2


def rule_tiers(texts):
    """The scripted labeler's own rule (not the demo's): more letters 'a' is better."""
    counts = sorted({t.count("a") for t in texts.values()}, reverse=True)
    return [sorted(i for i, t in texts.items() if t.count("a") == c) for c in counts]


def rank_on_page(page, tiers):
    """Keyboard only: put each response at its place in turn, then tie the tied ones."""
    for place, response in enumerate(r for tier in tiers for r in tier):
        page.focus(f'.card[data-id="{response}"]')
        page.keyboard.press(str(place + 1))
    for tier in tiers:
        for response in tier[1:]:
            page.focus(f'.card[data-id="{response}"]')
            page.keyboard.press("t")
    assert card_order(page) == [t[0] if len(t) == 1 else t for t in tiers]
    page.keyboard.press("Enter")


def test_closed_loop_page_and_api_rankings_train_a_reward_model(browser, tmp_path, capsys):
    import random

    from conftest import tiny_model

    from palm_rlhf.cli import main
    from palm_rlhf.data.preferences import load_preferences
    from palm_rlhf.tokenizers.base import ByteTokenizer
    from palm_rlhf.training.reward import split_preferences

    rng = random.Random(0)
    tasks = [
        Task(f"c{i:03d}", f"snippet {i}: ", ["".join(rng.choices("abcd", k=12)) for _ in range(4)],
             [True] * 4)
        for i in range(180)
    ]  # fmt: skip
    log = RankingLog(tmp_path / "r.jsonl")
    server = LabelServer(LabelSession(tasks, log), port=0, token="tok")
    server.serve_in_thread()
    try:
        page = open_page(browser, server, "script")
        for n in range(40):  # through the real page
            texts = {
                int(c.get_attribute("data-id")): c.query_selector(".response-text").text_content()
                for c in page.query_selector_all("#ranks .card")
            }
            rank_on_page(page, rule_tiers(texts))
            wait_rows(page, server, n + 1)
        for _ in range(140):  # the rest through the HTTP API, as a script would
            task = server.session.next_task("script")
            tiers = rule_tiers({r["id"]: r["text"] for r in task["responses"]})
            ranking = [t[0] if len(t) == 1 else t for t in tiers]
            server.session.submit(
                Submission(f"api{task['task_id']}", task["task_id"], "script", ranking,
                           False, [[]] * 4, 1.0)
            )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        log.close()
    written = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(written) == 180 and sum(r["submission_id"].startswith("api") for r in written) == 140

    tok = ByteTokenizer()
    tiny_model(num_tokens=tok.vocab_size, max_seq_len=64).save_pretrained(tmp_path / "trunk")
    argv = ["reward", "--init", str(tmp_path / "trunk"), "--data", str(tmp_path / "r.jsonl"),
            "--heldout-fraction", "0.3", "--steps", "200", "--batch-size", "8", "--seq-len", "48",
            "--lr", "1e-3", "--out", str(tmp_path / "rm")]  # fmt: skip
    assert main(argv) == 0
    data = load_preferences(tmp_path / "r.jsonl")
    _, heldout, _ = split_preferences(data, 0.3, seed=0)
    pairs = sum(g.ranks[i] != g.ranks[j] for g in heldout for i in range(4) for j in range(i))
    assert pairs >= 200
    metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m][-1]
    stderr = math.sqrt(accuracy * (1 - accuracy) / pairs)
    print(f"closed loop: held-out accuracy {accuracy:.3f} +- {stderr:.3f} on {pairs} pairs")
    assert accuracy - 3 * stderr > 0.5
