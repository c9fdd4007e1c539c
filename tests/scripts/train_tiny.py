"""Runs a tiny pretraining job; used by tests in a subprocess (multi-process, SIGKILL)."""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import palm_rlhf.storage.checkpoint as checkpoint_module
from palm_rlhf import ByteTokenizer
from palm_rlhf.config import PaLMConfig
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.lm import train_lm


def main() -> None:
    corpus, out, batch_size, mode = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    tok = ByteTokenizer()
    model_config = PaLMConfig(
        num_tokens=tok.vocab_size, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64
    )
    config = TrainConfig(
        seq_len=32,
        batch_size=batch_size,
        steps=3,
        lr=3e-3,
        warmup_steps=1,
        eval_every=0,
        sample_every=0,
        log_every=1,
        checkpoint_every=1,
        seed=1,
    )
    if mode == "kill-on-second-save":
        real_save = checkpoint_module.write_safetensors
        calls = []

        def save_then_die(handle, plans):
            calls.append(handle.name)
            if len(calls) > 2:  # checkpoint 1 writes two tensor files; die inside checkpoint 2
                handle.write(b"partial")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(handle, plans)

        checkpoint_module.write_safetensors = save_then_die
    accelerator = Accelerator(cpu=True)
    history = train_lm(
        model_config,
        config,
        out,
        accelerator=accelerator,
        tokenizer=tok,
        show_progress=False,
        data=corpus,
    )
    model = accelerator.unwrap_model(accelerator._models[0])
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "losses": [h["loss"] for h in history],
        "param_sum": flat.double().sum().item(),
        "param_first": flat[:8].tolist(),
    }
    (out / f"result_rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
