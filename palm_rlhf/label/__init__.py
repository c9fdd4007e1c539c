"""Human rankings: sampled tasks, the append-only rankings log, the local ranking page and the
statistics of what labelers did.

- `tasks.py` owns the tasks layout (`palm-rlhf sample` writes it, the page serves it).
- `log.py` owns the rankings log: every submission is one fsynced JSON line, undo appends a
  retraction, and the file is the rankings JSONL that `palm-rlhf reward` reads.
- `server.py` serves the page in `static/` (loopback, token, Host check) over `http.server`.
- `stats.py` counts, measures agreement between labelers, aggregates and exports pairs.
"""
