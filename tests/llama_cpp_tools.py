"""llama.cpp as a test oracle: its own converters (from llama-cpp-python's source package) and its runtime
(llama-cpp-python), each run in a subprocess.

``.ci/run`` installs llama-cpp-python (built from source once, then from a cached wheel) and unpacks the source
package's ``vendor/llama.cpp`` (the converters and their gguf-py) into a cache folder it names in
``LLAMA_CPP_SRC``. Every evaluation runs in a process of its own: when llama.cpp refuses an adapter,
llama-cpp-python 0.3.36 does not notice and the next evaluation crashes the process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EVAL_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
base, lora, scale, tokens, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
options = dict(model_path=base, n_ctx=64, n_batch=64, logits_all=True, type_k=0, type_v=0,  # f32 KV cache
               verbose=False, n_threads=1, seed=0)
if lora != "-":
    options.update(lora_path=lora, lora_scale=scale)
llm = Llama(**options)
if lora != "-" and not llm._lora_adapter:  # a NULL adapter pointer: llama.cpp refused the file
    sys.exit(3)
llm.eval(tokens)
np.save(out, np.array(llm.scores[: len(tokens)], dtype=np.float32))
"""


class AdapterRefused(Exception):
    """llama.cpp did not load the adapter file (its reason is in the message)."""


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


requires_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available(),
    reason="llama-cpp-python is not installed (.ci/run installs it; see docs/local-inference.md)",
)


def converters() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (``LLAMA_CPP_SRC``). Fails, never skips, where
    llama-cpp-python is installed but its converters were not unpacked: the tests would otherwise not run."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.fail("llama-cpp-python is installed but LLAMA_CPP_SRC does not name llama.cpp's source folder "
                    f"(got {src!r}). Run .ci/run, or unpack vendor/llama.cpp from llama-cpp-python's source "
                    "package and point LLAMA_CPP_SRC at it.")
    return Path(src)


def _run(args: list[str], what: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def convert_base(model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    _run([str(converters() / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype, "--outfile", str(out)],
         "convert_hf_to_gguf.py")
    return out


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f32") -> Path:
    _run([str(converters() / "convert_lora_to_gguf.py"), "--base", str(base_dir), "--outtype", outtype,
          "--outfile", str(out), str(adapter_dir)], "convert_lora_to_gguf.py")
    return out


def logits(base_gguf: Path, tokens: list[int], tmp: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    """llama.cpp's logits (len(tokens), vocab) for ``tokens``, with the adapter ``lora`` at ``scale``."""
    out = tmp / f"logits-{os.getpid()}-{len(list(tmp.iterdir()))}.npy"
    result = subprocess.run(
        [sys.executable, "-c", EVAL_SCRIPT, str(base_gguf), str(lora or "-"), str(scale), json.dumps(tokens),
         str(out)], capture_output=True, text=True, timeout=300,
    )
    if result.returncode == 3:
        raise AdapterRefused(result.stderr[-2000:])
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp evaluation failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return np.load(out)


def sentencepiece_tokenizer(path: Path, vocab_size: int = 60) -> None:
    """A tiny SentencePiece model trained offline (the converters need a tokenizer; the tests feed token ids)."""
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = (f"w{i} x{i % 7} y{i % 13}" for i in range(400))
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())
