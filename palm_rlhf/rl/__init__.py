"""Online reinforcement learning from feedback: everything that samples from the policy.

`rollout` owns sampling, scoring and the no-gradient log-prob pass that every online method
shares; `online` the setup PPO and GRPO share (actor and reference, generators, reward sources,
the run directory and saved state, the iteration driver); `ppo` adds a critic and GAE, `grpo`
the critic-free methods (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++). Their maths lives in
`losses/` as pure functions with hand-computed tests. Offline DPO is a supervised loop
(`training/dpo`). Every trainer keeps the policy's frozen base and trains a LoRA scope on it, so
the reference policy is the base with adapters off: no copy.
"""
