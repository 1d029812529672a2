"""GRPO with TRL on an injected model; with beta > 0 the KL reference is the starting policy, on the same
weights. Runs on CPU in seconds.

    python examples/trl_grpo.py OUT_DIR
"""

import sys

import datasets
from tiny_lm import preference_pairs, tiny_llama, tiny_tokenizer
from trl import GRPOConfig

import lora_inject as li
from lora_inject.trl import GRPOTrainer


def longer_is_better(completions, **_):
    return [float(len(c.split())) for c in completions]


out = sys.argv[1] if len(sys.argv) > 1 else "grpo-out"
tokenizer = tiny_tokenizer()
model = li.inject(tiny_llama(tokenizer), targets=["q_proj", "v_proj"], r=4, alpha=8)
prompts = datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in preference_pairs()])
args = GRPOConfig(output_dir=out, max_steps=2, save_steps=2, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=6, beta=0.1, learning_rate=1e-3, logging_steps=1, report_to=[],
                  use_cpu=True, bf16=False, disable_tqdm=True)
trainer = GRPOTrainer(model=model, reward_funcs=longer_is_better, args=args, train_dataset=prompts,
                      processing_class=tokenizer)
trainer.train()
trainer.save_model(f"{out}/adapter")
print("step-1 kl", trainer.state.log_history[0]["kl"], "adapter saved to", f"{out}/adapter")
