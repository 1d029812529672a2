"""SFT with TRL on an injected model: checkpoints are adapter folders. Runs on CPU in seconds.

    python examples/trl_sft.py OUT_DIR
"""

import sys

import datasets
from tiny_lm import sft_texts, tiny_llama, tiny_tokenizer
from trl import SFTConfig

import lora_inject as li
from lora_inject.trl import SFTTrainer

out = sys.argv[1] if len(sys.argv) > 1 else "sft-out"
tokenizer = tiny_tokenizer()
model = li.inject(tiny_llama(tokenizer), targets=["q_proj", "v_proj"], r=4, alpha=8)
args = SFTConfig(output_dir=out, max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                 report_to=[], use_cpu=True, bf16=False, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(sft_texts()),
                     processing_class=tokenizer)
trainer.train()                      # resume later with trainer.train(resume_from_checkpoint=True)
trainer.save_model(f"{out}/adapter")  # PEFT's files: li.load_adapter / PeftModel.from_pretrained read them
print("adapter saved to", f"{out}/adapter")
