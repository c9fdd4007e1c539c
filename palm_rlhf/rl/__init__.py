"""Reinforcement learning from feedback: everything after the reward model.

`rollout` owns sampling, scoring and the no-gradient log-prob pass that every online method
shares; `ppo` adds a critic and GAE on top of it, `grpo` the critic-free methods (GRPO, Dr.
GRPO, DAPO, GSPO, RLOO, REINFORCE++); `dpo` learns offline from preference files. The maths of
each lives in pure functions (`rl_math` for what PPO and the others share, `grpo_math`,
`dpo_math`) with hand-computed tests. Every trainer keeps the policy's frozen base and trains a
LoRA scope on it, so the reference policy is the base with adapters off: no copy.
"""
