"""The supervised loops (pretrain/SFT, reward model, DPO), their configs, and the mechanics they
share: the optimizer and learning-rate schedule, the step, run directories and training
checkpoints."""
