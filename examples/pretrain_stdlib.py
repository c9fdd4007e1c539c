"""Pretrain the `tiny` PaLM on the Python standard library's own sources, then sample from it.

python examples/pretrain_stdlib.py --minutes 10 --out runs/tiny
accelerate launch --config_file examples/accelerate/gpus.yaml examples/pretrain_stdlib.py ...
"""

import argparse
from pathlib import Path

from palm_rlhf import ByteTokenizer, PaLM, generate
from palm_rlhf.config import preset_config
from palm_rlhf.tokenizers.base import encode_prompt
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.lm import train_lm
from palm_rlhf.training.state import TrainingCheckpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--minutes", type=float, default=0.0, help="stop early after this long")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    tokenizer = ByteTokenizer()
    model_config = preset_config("tiny", tokenizer.vocab_size)
    config = TrainConfig(
        seq_len=256,
        batch_size=16,
        steps=args.steps,
        lr=2e-3,
        warmup_steps=50,
        eval_every=100,
        eval_batches=16,
        sample_every=0,
        checkpoint_every=200,
        time_limit_s=args.minutes * 60,
    )
    history = train_lm(model_config, config, args.out, resume=args.resume, data="stdlib")
    print("final held-out bits per byte:", history[-1].get("eval_bpb"))

    model = PaLM.from_pretrained(TrainingCheckpoints(args.out / "checkpoints").latest())
    prompts = ["def ", "import ", "class "]
    out = generate(
        model,
        [encode_prompt(tokenizer, p) for p in prompts],
        max_new_tokens=200,
        temperature=0.7,
        top_p=0.95,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        seed=0,
    )
    for prompt, tokens, mask in zip(prompts, out.tokens, out.mask, strict=True):
        print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(tokens[mask])}")


if __name__ == "__main__":
    main()
