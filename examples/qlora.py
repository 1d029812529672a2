"""QLoRA end to end on CPU in seconds: a 4-bit (nf4) base, LoRA training, and an exact float export.

    python examples/qlora.py OUT_DIR

1. a tiny Llama in float32 stands in for the published checkpoint (OUT_DIR/base);
2. it is loaded in nf4 with double quantization (float32 compute: bf16 matmuls are slow on CPUs);
3. prepare_for_kbit_training + inject, a few AdamW steps, the adapter saved in PEFT's files;
4. the adapter is merged into the *float* checkpoint with `lora-inject merge` (the update is kept
   exactly; merging into the 4-bit weights would round most of it away).
"""

import sys
from pathlib import Path

import torch
import transformers

import lora_inject as li
from lora_inject.cli import main as lora_inject_cli

out = Path(sys.argv[1] if len(sys.argv) > 1 else "qlora-out")
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
transformers.LlamaForCausalLM(config).save_pretrained(out / "base")

nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
model = transformers.AutoModelForCausalLM.from_pretrained(out / "base", quantization_config=nf4)
li.hf.prepare_for_kbit_training(model)
li.inject(model, targets="all-linear", r=8, alpha=16)
print(li.trainable_parameters(model))

ids = torch.randint(0, 128, (4, 32))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(5):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")
li.save_adapter(model, out / "adapter")

lora_inject_cli(["merge", str(out / "base"), str(out / "adapter"), str(out / "merged"), "--verify", "--quiet"])
print("merged float checkpoint in", out / "merged")
