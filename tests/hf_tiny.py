"""Tiny random Hugging Face decoders and a byte-level BPE tokenizer, saved with save_pretrained.

Built in the test run (seconds), never downloaded. Shared by the convert and generate tests.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "phi", "gpt2")
VOCAB = 256


def tokenizer(path: Path, vocab: int = VOCAB) -> object:
    """A byte-level BPE tokenizer trained on ``pydoc_data.topics`` in a second, saved to ``path``."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values())[:40], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return fast


def decoder(family: str, path: Path, *, layers: int = 2, hidden: int = 64, vocab: int = VOCAB,
            seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A random ``family`` decoder (grouped KV heads where the family has them) saved to ``path``."""
    import torch
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 4, "max_position_embeddings": 1024,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=4096, **common))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, **common))
    elif family == "phi":
        model = tf.PhiForCausalLM(tf.PhiConfig(partial_rotary_factor=0.5, **common))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_positions=1024, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(family)
    model.eval().save_pretrained(str(path))
    if with_tokenizer:
        tokenizer(path, vocab)
    return path


def converted(family: str, tmp: Path, *, layers: int = 2, dest: Path | None = None) -> tuple[Path, Path]:
    """``(save_pretrained folder, converted text-generation folder)`` of a random ``family`` decoder.

    The converter's own check is skipped: the tests that use this compare with transformers themselves.
    """
    from onnxpipe.converter.huggingface import convert_folder

    src = decoder(family, tmp / "hf", layers=layers)
    out = dest or tmp / "onnx"
    convert_folder(src, out, check=False)
    return src, out
