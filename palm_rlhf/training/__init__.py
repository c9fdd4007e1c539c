"""The supervised loops (pretrain/SFT, reward model, DPO), their configs, and the mechanics they
share: the optimizer and learning-rate schedule, the step, run directories, training
checkpoints, and sharding models over processes with FSDP2 (`fsdp`), which the online trainers
use too."""
