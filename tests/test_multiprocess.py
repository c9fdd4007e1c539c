"""Two real CPU processes under `accelerate launch`: the checks of tests/scripts/two_rank_checks.py
(one launch for all of them; starting two processes is the slow part)."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import two_process_launch


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    script = Path(__file__).parent / "scripts" / "two_rank_checks.py"
    result = subprocess.run(
        [*two_process_launch(), str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_really_ran(ranks):
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["rank"] for r in ranks] == [0, 1]


def test_reward_training_with_parameters_that_get_no_gradient(ranks):
    # A rating head with ranking-only data and an adapter scope the trunk never applies used to
    # crash DDP at step 2; all 3 steps now run on both ranks.
    assert [r["reward_steps"] for r in ranks] == [3, 3]


def test_adaptive_kl_coefficient_is_the_same_on_every_rank(ranks):
    # Each rank samples different responses, so its own KL differs; the coefficient must come
    # from the KL averaged over processes, or the ranks drift apart.
    assert ranks[0]["kl_coefs"] == ranks[1]["kl_coefs"]
    assert ranks[0]["kl_coef_after"] == ranks[1]["kl_coef_after"]
    assert ranks[0]["kl_coef_after"] != ranks[0]["kl_coefs"][0]  # the controller really moved
    # Actor and critic stay identical across ranks (gradients are averaged before each step).
    assert ranks[0]["param_sums"] == ranks[1]["param_sums"]
    assert any(".adapters.actor." in k for k in ranks[0]["param_sums"])


def test_resumed_two_process_ppo_reproduces_the_uninterrupted_run(ranks):
    for rank in ranks:
        assert rank["resumed"] == rank["straight"]
    # Each rank got its own sampling generator back (not rank 0's).
    assert ranks[0]["sampling_state"] != ranks[1]["sampling_state"]


def test_time_limit_is_decided_once_for_all_ranks(ranks):
    # Rank 1's clock says the limit passed after step 1; rank 0's says it did not. Rank 0
    # decides, so both train all 4 steps (disagreeing ranks would hang in a collective).
    assert [r["lm_last_step"] for r in ranks] == [4, 4]


def test_two_process_grpo_stays_in_step_and_resumes_exactly(ranks):
    # Dynamic sampling, batch-std advantages and DAPO's token normaliser all cross processes:
    # every rank logs the same metrics and ends with the same adapter.
    assert ranks[0]["grpo_history"] == ranks[1]["grpo_history"]
    assert ranks[0]["grpo_param_sums"] == ranks[1]["grpo_param_sums"]
    assert any(".adapters.actor." in k for k in ranks[0]["grpo_param_sums"])
    assert ranks[0]["grpo_prompts"] != ranks[1]["grpo_prompts"]  # each rank its own prompts
    for rank in ranks:
        assert rank["grpo_resumed"] == rank["grpo_straight"]


def test_two_process_dpo_logs_the_same_numbers_on_every_rank(ranks):
    assert [r["step"] for r in ranks[0]["dpo_history"]] == [1, 2, 3, 4]
    assert ranks[0]["dpo_history"] == ranks[1]["dpo_history"]
    assert "eval_reward_accuracy" in ranks[0]["dpo_history"][-1]
    assert ranks[0]["dpo_adapter_sum"] != 0.0  # the adapter trained (B starts at zero)
