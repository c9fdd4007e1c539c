"""The ranking page's HTTP server: the standard library's `http.server`, one thread a request.

Safe by default for a tool that shows untrusted model output in a browser:
- binds 127.0.0.1 unless told otherwise (and warns when bound to every interface);
- every request needs the session's token: `?token=` once (it becomes an HttpOnly, SameSite=
  Strict cookie and the address bar is redirected to drop it, as Jupyter does), or an
  `Authorization: Bearer` header for scripts;
- the Host header must name this server (a DNS-rebinding page cannot reach it);
- POST bodies are JSON (a content type a cross-site form cannot send) of at most 64 KiB;
- the page sets model text with `textContent`, and a Content-Security-Policy allows only this
  server's own script and style, so even a missed escape could not run inline script.
Bad input gets a 4xx with a JSON `{"error": ...}` naming the problem, and nothing is written.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .log import Submission, SubmissionConflict
from .session import LabelSession, UnknownTask

MAX_BODY = 64 * 1024
COOKIE = "palm_rlhf_label"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("palm_rlhf.label").joinpath("static", name).read_bytes()


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        session: LabelSession,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        super().__init__((host, port), Handler)
        self.session = session
        self.token = token or secrets.token_urlsafe(24)
        self.port = self.server_address[1]
        # One cookie per port: two servers on this host must not overwrite each other's.
        self.cookie = f"{COOKIE}_{self.port}"
        names = {"127.0.0.1", "localhost", "[::1]", *allowed_hosts}
        self.allowed_hosts = {f"{name}:{self.port}" for name in names} | set(allowed_hosts)

    def url(self, with_token: bool = True) -> str:
        base = f"http://127.0.0.1:{self.port}/"
        return f"{base}?token={self.token}" if with_token else base

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="palm-rlhf-label", daemon=True)
        thread.start()
        return thread


class Handler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass  # the page polls; a line per request would drown the URL the user needs

    # --------------------------------------------------------------------- plumbing

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _authorised(self, query: dict[str, list[str]]) -> tuple[bool, bool]:
        """(authorised, by the query token): the query token is accepted on GET / only."""
        token = self.server.token.encode()
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token):
            return True, False
        # Parsed by hand: SimpleCookie drops every cookie when any one is malformed, and other
        # apps on 127.0.0.1 (any port) share this cookie jar.
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.server.cookie and hmac.compare_digest(value.encode(), token):
                return True, False
        given = query.get("token", [""])[0].encode()
        return bool(given) and hmac.compare_digest(given, token), True

    def _handle(self) -> None:
        self._body_read = False
        try:
            if self.headers.get("Host", "") not in self.server.allowed_hosts:
                raise RequestError(
                    HTTPStatus.FORBIDDEN,
                    f"Host {self.headers.get('Host')!r} is not this server (allowed: "
                    f"{sorted(self.server.allowed_hosts)}; add names with --allowed-hosts)",
                )
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            ok, by_query = self._authorised(query)
            if not ok:
                raise RequestError(
                    HTTPStatus.UNAUTHORIZED,
                    "missing or wrong token: open the URL `palm-rlhf label` printed",
                )
            if by_query:
                if self.command != "GET" or parts.path != "/":
                    raise RequestError(HTTPStatus.UNAUTHORIZED, "the token goes in a cookie")
                self._send(
                    HTTPStatus.SEE_OTHER,
                    b"",
                    "text/plain",
                    Location="/",
                    Set_Cookie=f"{self.server.cookie}={self.server.token}; HttpOnly; "
                    "SameSite=Strict; Path=/",
                )
                return
            if self.command in ("GET", "HEAD"):
                self._get(parts.path, query)
            else:
                self._post(parts.path, self._body())
        except RequestError as error:
            if self.command == "POST" and not self._body_read:
                self.close_connection = True  # an unread body must not become a "request"
            self._json(error.status, {"error": str(error)})
        except SubmissionConflict as error:
            self._json(HTTPStatus.CONFLICT, {"error": str(error)})
        except UnknownTask as error:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(error)})
        except ValueError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # a bug: say so, keep serving the other labelers
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"}
            )

    do_GET = do_HEAD = do_POST = _handle  # noqa: N815 (http.server's names)

    def _body(self) -> dict[str, Any]:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required") from None
        if not 0 <= length <= MAX_BODY:
            if 0 < length <= 16 * MAX_BODY:
                self.rfile.read(length)  # read it, so the client sees the reply, not a reset
                self._body_read = True
            else:
                self.close_connection = True  # unread, it would be parsed as the next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes ({length})"
            )
        data = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON body ({error})") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    # --------------------------------------------------------------------- routes

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        session = self.server.session
        if path in STATIC:
            name, content_type = STATIC[path]
            self._send(HTTPStatus.OK, _static(name), content_type)
        elif path == "/api/next":
            labeler = _labeler(query.get("labeler", [""])[0])
            task = session.next_task(labeler)
            self._json(HTTPStatus.OK, {"task": task, "progress": session.progress(labeler)})
        elif path == "/api/progress":
            labeler = query.get("labeler", [None])[0]
            self._json(HTTPStatus.OK, session.progress(labeler and _labeler(labeler)))
        else:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no page {path!r}")

    def _post(self, path: str, body: dict[str, Any]) -> None:
        session = self.server.session
        if path == "/api/submit":
            submission = _submission(body)
            written = session.submit(submission)
            progress = session.progress(submission.labeler)
            self._json(HTTPStatus.OK, {"written": written, "progress": progress})
        elif path == "/api/undo":
            labeler = _labeler(body.get("labeler"))
            row = session.undo(labeler, _string(body, "submission_id"))
            if row is None:
                raise RequestError(HTTPStatus.CONFLICT, f"{labeler!r} has nothing to undo")
            self._json(HTTPStatus.OK, {"undone": row["retracts"], "task_id": row["task_id"]})
        elif path == "/api/skip":
            session.skip(_labeler(body.get("labeler")), _string(body, "task_id"))
            self._json(HTTPStatus.OK, {"skipped": body["task_id"]})
        elif path == "/api/done":
            session.done.set()
            self._json(HTTPStatus.OK, session.progress())
        else:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {path!r}")


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    return value


def _labeler(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 100:
        raise ValueError("labeler must be a non-empty name of at most 100 characters")
    return value.strip()


def _submission(body: dict[str, Any]) -> Submission:
    allowed = {"submission_id", "task_id", "labeler", "ranking", "not_rankable", "flags",
               "duration_s"}  # fmt: skip
    unknown = sorted(body.keys() - allowed)
    if unknown:
        raise ValueError(f"unknown fields {unknown} (expected {sorted(allowed)})")
    ranking = body.get("ranking")
    if not isinstance(ranking, list):
        raise ValueError("field 'ranking' must be a list (best first; a nested list is a tie)")
    not_rankable = body.get("not_rankable", False)
    if not isinstance(not_rankable, bool):
        raise ValueError("field 'not_rankable' must be true or false")
    duration = body.get("duration_s", 0.0)
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise ValueError("field 'duration_s' must be a number")
    flags = body.get("flags")
    if not isinstance(flags, list):
        raise ValueError("field 'flags' must be a list with one list of names per response")
    return Submission(
        submission_id=_string(body, "submission_id"),
        task_id=_string(body, "task_id"),
        labeler=_labeler(body.get("labeler")),
        ranking=ranking,
        not_rankable=not_rankable,
        flags=flags,
        duration_s=float(duration),
    )


def serve_until_done(
    session: LabelSession,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
    announce: Any = print,
) -> None:
    """Serve the page until the session is done ("Done labeling", or its target count) or
    Ctrl-C; `announce` gets the lines a user needs (the URL with its token first)."""
    server = LabelServer(session, host, port, token, allowed_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        announce(
            f"warning: serving on {host}: anyone who can reach this machine and has the token "
            "can rank; the page is plain http"
        )
    announce(f"ranking page: {server.url()}")
    announce(
        f"rankings are appended to {session.log.path}; press Ctrl-C or 'Done labeling' to stop"
    )
    server.serve_in_thread()
    try:
        while not session.done.wait(0.5):
            pass
        time.sleep(0.5)  # the reply to the request that ended the session is still going out
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
