"""Pure tensor maths, unit-tested against hand-computed numbers: the language-model loss, masked
statistics (one whitening), token log-probs and entropy, preference losses for the reward model,
and the PPO, GRPO-family and DPO objectives. Nothing here imports a model."""
