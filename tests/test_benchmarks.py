"""The benchmarks time our trainers through hooks and wrappers, which rot when the library
changes (bench_ppo's eos hook crashed on the chunked log-prob passes for weeks, and the
benchmark still exited 0 with no figure for us). Our side of each runs here at --quick size;
the peers' need the [bench] extra and are not run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["bench_ppo.py", "bench_grpo.py"])
def test_our_side_of_the_iteration_benchmarks_runs(script, tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--only", "ours",
               "--repeats", "1", "--json", str(out)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    ours = report["results"].get("ours")
    assert ours is not None, (run.stdout + run.stderr)[-2000:]
    assert ours["s_per_iter"] > 0 and ours["params"] > 0
    # every response has all its tokens: the eos hook worked on the decoding logits
    assert ours["response_len"] == report["config"]["new"]
