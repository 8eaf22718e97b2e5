"""DPPO with TRL: TRL's GRPO script shape (TrlParser, a dataset, reward functions, ``trainer.train()``) whose
trainer is dppo's ``DPPOTrainer``, i.e. TRL's ``GRPOTrainer`` with dppo's loss (docs/integrations.md).

    python examples/trl_dppo.py --model_name_or_path Qwen/Qwen3-0.6B --output_dir runs/trl-dppo \\
        --method dppo-binary-tv --num_generations 8 --per_device_train_batch_size 8 --max_completion_length 64

    --method dppo-topk-tv            any dppo preset (dppo.PRESETS); --delta_low/--delta_high/--ratio_cap override it
    --rollout_engine vllm            sample with dppo's vLLM engine in this process (every preset, Top-K included)
    --use_vllm --vllm_mode server    TRL's own vLLM server (binary and ratio presets), started with
                                     --logprobs-mode processed_logprobs (dppo refuses a server that is not)
    --config dppo.yaml               TRL's YAML config file, as for its own scripts

Without ``--dataset_name`` it trains on generated addition problems ("37+45="; reward 1 when the completion starts
with the sum). A dataset of your own needs ``prompt`` and ``answer`` columns for this reward function.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser

from dppo.integrations.trl import DPPOConfig, DPPOTrainer


@dataclass
class DPPOScriptArguments(ScriptArguments):
    num_problems: int = field(default=512, metadata={"help": "generated addition problems (without --dataset_name)"})


def sum_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1 when the completion starts with the answer (a whole number), else 0."""
    return [1.0 if re.match(rf"\s*{re.escape(a)}(?!\d)", c) else 0.0 for c, a in zip(completions, answer)]


def addition_dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return Dataset.from_list(rows)


def parse(argv: list[str] | None = None) -> tuple[DPPOScriptArguments, DPPOConfig, ModelConfig]:
    return TrlParser((DPPOScriptArguments, DPPOConfig, ModelConfig)).parse_args_and_config(args=argv)


def main(script_args: DPPOScriptArguments, training_args: DPPOConfig, model_args: ModelConfig) -> DPPOTrainer:
    if model_args.dtype is not None:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "dtype": model_args.dtype}
    if script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        dataset = dataset[script_args.dataset_train_split]
    else:
        dataset = addition_dataset(script_args.num_problems, training_args.seed)
    trainer = DPPOTrainer(model=model_args.model_name_or_path, reward_funcs=sum_reward, args=training_args,
                          train_dataset=dataset)
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main(*parse())
