"""A tiny Llama and a word-level tokenizer built offline, for the TRL examples (nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = (
    "the a cat dog sat on mat ran to park is good bad happy sad yes no question answer what color sky blue "
    "green red sun moon day night hello world i you like do not".split()
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(tokenizer: transformers.PreTrainedTokenizerFast, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def sft_texts(n: int = 16) -> list[dict[str, str]]:
    lines = ["the cat sat on the mat", "the dog ran to the park", "the sky is blue", "i like the sun"]
    return [{"text": lines[i % len(lines)]} for i in range(n)]


def preference_pairs(n: int = 8) -> list[dict[str, str]]:
    pairs = [("what color is the sky", " blue", " red"), ("is the cat happy", " yes", " no")]
    return [dict(zip(("prompt", "chosen", "rejected"), pairs[i % len(pairs)])) for i in range(n)]
