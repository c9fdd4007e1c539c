"""The ranking page's HTTP server: token, cookie, Host check, limits, errors, and load."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from palm_rlhf.data.preferences import load_preferences
from palm_rlhf.label.log import RankingLog, read_log
from palm_rlhf.label.server import MAX_BODY, LabelServer
from palm_rlhf.label.session import LabelSession
from palm_rlhf.label.tasks import Task, write_tasks


def make_tasks(n, k=3):
    return [
        Task(f"t{i}", f"prompt {i}", [f"r{i}.{j}" for j in range(k)], [True] * k) for i in range(n)
    ]


@pytest.fixture
def server(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    srv = LabelServer(LabelSession(make_tasks(5), log, per_task=1), port=0, token="secret")
    srv.serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()
    log.close()


def call(port, method, path, body=None, token="secret", headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = {"Host": f"127.0.0.1:{port}"}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    if body is not None or raw is not None:
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=sent)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, (json.loads(payload) if is_json else payload), response


def submit_body(task_id, sid, labeler="ana", ranking=(0, 1, 2)):
    return {
        "submission_id": sid,
        "task_id": task_id,
        "labeler": labeler,
        "ranking": list(ranking),
        "not_rankable": False,
        "flags": [[], [], []],
        "duration_s": 2.0,
    }


def log_lines(server):
    return server.session.log.path.read_text().splitlines()


def test_the_token_becomes_an_http_only_strict_cookie_and_leaves_the_address(server):
    status, body, _ = call(server.port, "GET", "/", token=None)
    assert status == 401 and "token" in body["error"]
    status, _, response = call(server.port, "GET", "/?token=wrong", token=None)
    assert status == 401
    status, _, response = call(server.port, "GET", "/?token=secret", token=None)
    assert status == 303 and response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie")
    # Named by port: a second server on this host must not overwrite it.
    assert f"palm_rlhf_label_{server.port}=secret" in cookie and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    # Another local app's malformed cookie in the same jar must not lock the labeler out.
    jar = {"Cookie": 'other="a b; x=y z; ' + cookie.split(";")[0]}
    status, page, response = call(server.port, "GET", "/", token=None, headers=jar)
    assert status == 200 and b'<script src="/static/app.js"' in page
    assert "script-src 'self'" in response.getheader("Content-Security-Policy")
    status, script, _ = call(server.port, "GET", "/static/app.js", token=None, headers=jar)
    assert status == 200 and b"textContent" in script and b"innerHTML" not in script
    # The token in a query is accepted on the page only, never on the API.
    status, _, _ = call(server.port, "GET", "/api/next?labeler=a&token=secret", token=None)
    assert status == 401


def test_a_foreign_host_header_is_refused(server):
    # A DNS-rebinding page reaches 127.0.0.1 under its own name.
    status, body, _ = call(server.port, "GET", "/api/progress", headers={"Host": "evil.test"})
    assert status == 403 and "evil.test" in body["error"]
    status, _, _ = call(
        server.port, "GET", "/api/progress", headers={"Host": f"localhost:{server.port}"}
    )
    assert status == 200


@pytest.mark.parametrize(
    "change, status, problem",
    [
        ({"ranking": [0, 1, 1]}, 400, "appears more than once"),
        ({"ranking": [0, 1]}, 400, "missing \\[2\\]"),
        ({"task_id": "nope"}, 404, "unknown task 'nope'"),
        ({"flags": "x"}, 400, "flags"),
        ({"extra": 1}, 400, "unknown fields \\['extra'\\]"),
        ({"labeler": ""}, 400, "labeler"),
        ({"duration_s": "fast"}, 400, "duration_s"),
    ],
)
def test_bad_submissions_get_a_4xx_naming_the_problem_and_write_nothing(
    server, change, status, problem
):
    got, body, _ = call(server.port, "POST", "/api/submit", submit_body("t0", "s1") | change)
    assert got == status and re.search(problem, body["error"])
    assert log_lines(server) == []


def test_malformed_oversized_and_wrong_type_bodies(server):
    status, body, _ = call(server.port, "POST", "/api/submit", raw=b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]
    status, body, _ = call(server.port, "POST", "/api/submit", raw=b"x" * (MAX_BODY + 1))
    assert status == 413
    status, body, _ = call(
        server.port, "POST", "/api/submit", raw=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert status == 415  # what a cross-site form could send
    assert log_lines(server) == []


def test_retry_is_idempotent_a_reused_id_conflicts_and_undo_appends(server):
    port = server.port
    status, task, _ = call(port, "GET", "/api/next?labeler=ana")
    task_id = task["task"]["task_id"]
    assert call(port, "POST", "/api/submit", submit_body(task_id, "s1"))[1]["written"]
    status, body, _ = call(port, "POST", "/api/submit", submit_body(task_id, "s1"))
    assert status == 200 and body["written"] is False
    status, body, _ = call(
        port, "POST", "/api/submit", submit_body(task_id, "s1", ranking=[2, 1, 0])
    )
    assert status == 409
    assert len(log_lines(server)) == 1
    status, body, _ = call(port, "POST", "/api/undo", {"labeler": "ana", "submission_id": "u1"})
    assert status == 200 and body == {"undone": "s1", "task_id": task_id}
    status, body, _ = call(port, "POST", "/api/undo", {"labeler": "bo", "submission_id": "u2"})
    assert status == 409 and "nothing to undo" in body["error"]
    assert [json.loads(line).get("retracts") for line in log_lines(server)] == [None, "s1"]
    assert call(port, "GET", "/api/next?labeler=ana")[1]["task"]["task_id"] == task_id


def labeler_run(port, name, count):
    acknowledged = []
    for i in range(count):
        _, body, _ = call(port, "GET", f"/api/next?labeler={name}")
        task = body["task"]
        sid = f"{name}-{i}"
        status, _, _ = call(port, "POST", "/api/submit", submit_body(task["task_id"], sid, name))
        assert status == 200
        acknowledged.append(sid)
    return acknowledged


def test_eight_concurrent_labelers_write_exactly_their_400_rows(tmp_path):
    log = RankingLog(tmp_path / "r.jsonl")
    srv = LabelServer(LabelSession(make_tasks(400), log), port=0, token="secret")
    srv.serve_in_thread()
    try:
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda n: labeler_run(srv.port, f"lab{n}", 50), range(8)))
    finally:
        srv.shutdown()
        srv.server_close()
        log.close()
    lines = (tmp_path / "r.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 401  # whole lines only, no interleaving
    rows = [json.loads(line) for line in lines[:-1]]
    assert sorted(r["submission_id"] for r in rows) == sorted(sum(done, []))
    assert len({r["task_id"] for r in rows}) == 400  # per_task 1: no task ranked twice
    assert len(load_preferences(tmp_path / "r.jsonl").groups) == 400


def test_sigkill_mid_stream_keeps_every_acknowledged_ranking(tmp_path):
    write_tasks(make_tasks(300), tmp_path / "tasks.jsonl")
    out = tmp_path / "r.jsonl"

    def start():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "palm_rlhf.cli",
                "label",
                "--tasks",
                str(tmp_path / "tasks.jsonl"),
                "--out",
                str(out),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
        assert match, line + proc.stderr.read()
        return proc, int(match[1]), match[2]

    proc, port, token = start()
    acknowledged, stop = [], threading.Event()

    def stream(name):
        i = 0
        while not stop.is_set():
            try:
                _, body, _ = call(port, "GET", f"/api/next?labeler={name}", token=token)
                sid = f"{name}-{i}"
                status, _, _ = call(
                    port,
                    "POST",
                    "/api/submit",
                    submit_body(body["task"]["task_id"], sid, name),
                    token=token,
                )
            except (OSError, http.client.HTTPException):
                return  # the server died under us; whatever was acknowledged must be there
            if status == 200:
                acknowledged.append(sid)
            i += 1

    threads = [threading.Thread(target=stream, args=(f"lab{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 40:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    proc, port, token = start()  # a restart repairs a torn tail, if the kill left one
    try:
        written = {row["submission_id"] for _, row in read_log(out)}
        assert set(acknowledged) <= written
        assert out.read_bytes().endswith(b"\n")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == len(written)  # every line is a whole row
        served = call(port, "GET", "/api/next?labeler=lab0", token=token)[1]["task"]["task_id"]
        assert served not in {r["task_id"] for r in rows}
    finally:
        proc.kill()
        proc.wait()


def test_every_interface_gets_a_warning_and_only_the_allowed_names(tmp_path):
    from palm_rlhf.label.server import serve_until_done

    log = RankingLog(tmp_path / "r.jsonl")
    session = LabelSession(make_tasks(1), log)
    session.done.set()  # returns at once: what matters here is what it announced
    lines = []
    serve_until_done(session, "0.0.0.0", 0, announce=lines.append)
    assert lines[0].startswith("warning: serving on 0.0.0.0") and "ranking page" in lines[1]
    srv = LabelServer(session, "0.0.0.0", 0, token="secret", allowed_hosts=("lab.example",))
    srv.serve_in_thread()
    try:
        for host, status in (("lab.example", 200), (f"lab.example:{srv.port}", 200),
                             ("other.example", 403)):  # fmt: skip
            got, _, _ = call(srv.port, "GET", "/api/progress", headers={"Host": host})
            assert got == status, host
    finally:
        srv.shutdown()
        srv.server_close()
        log.close()
