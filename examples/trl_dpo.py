"""DPO with TRL after SFT: the reference is the SFT policy (a frozen copy of its adapter on the same
weights), not the bare base and not a second model. Runs on CPU in seconds.

    python examples/trl_dpo.py OUT_DIR [SFT_ADAPTER]
"""

import sys

import datasets
from tiny_lm import preference_pairs, tiny_llama, tiny_tokenizer
from trl import DPOConfig

import lora_inject as li
from lora_inject.trl import DPOTrainer

out = sys.argv[1] if len(sys.argv) > 1 else "dpo-out"
tokenizer = tiny_tokenizer()
model = tiny_llama(tokenizer)
if len(sys.argv) > 2:
    li.load_adapter(model, sys.argv[2])        # continue from an SFT adapter: it is also the reference
else:
    li.inject(model, targets=["q_proj", "v_proj"], r=4, alpha=8)
args = DPOConfig(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                 logging_steps=1, report_to=[], use_cpu=True, bf16=False, disable_tqdm=True)
trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(preference_pairs()),
                     processing_class=tokenizer)
trainer.train()
trainer.save_model(f"{out}/adapter")
first = next(h for h in trainer.state.log_history if "rewards/margins" in h)
print("step-1 rewards/margins", first["rewards/margins"], "adapter saved to", f"{out}/adapter")
