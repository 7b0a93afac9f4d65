"""Tiny models built from config, with a tokenizer trained in memory: no hub, no network.

Used by the tests, the benchmarks and the demo. A tiny model is an ordinary
transformers directory (safetensors weights, config, tokenizer with a chat template),
so everything that loads a real model loads it the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer: arithmetic, short sentences, answer tags."""
    import random
    rng = random.Random(seed)
    words = ("the a of to and in is it you that he was for on are with as his they be at one "
             "have this from or had by hot word but what some we can out other were all there "
             "when up use your how said an each she which do their time if will way about many "
             "then them write would like so these her long make thing see him two has look more "
             "answer question think step sum plus minus times equals number reverse copy").split()
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"What is {a}+{b}? Answer: {a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".")
        lines.append(f"<think>{a} plus {b}</think><answer>{a + b}</answer>")
    return lines


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer (digits split one by one) trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                       intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)  # the tiny tokenizer adds no BOS, so none is named


def build_tiny_model(out_dir: str | os.PathLike, kind: str = "causal", hidden: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0, tokenizer=None) -> Path:
    """Write a randomly initialised tiny model (``causal`` LM or scalar ``reward`` model)
    and its tokenizer to ``out_dir`` as safetensors; return the directory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', not {kind!r}")
    tokenizer = tokenizer or train_tokenizer()
    cfg = tiny_config(tokenizer, hidden, layers, heads)
    torch.manual_seed(seed)
    if kind == "reward":
        cfg.num_labels = 1  # transformers 5 refuses from_config(cfg, num_labels=1)
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def random_texts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` texts of ``lo``-``hi`` tokens (uniform), cut from the tiny corpus: mixed-length
    inputs for benchmarks."""
    import random
    rng = random.Random(seed)
    corpus = default_corpus(300, seed=seed + 1)
    out = []
    for _ in range(n):
        ids: list[int] = []
        target = rng.randint(lo, hi)
        while len(ids) < target:
            ids += tokenizer(rng.choice(corpus) + " ")["input_ids"]
        out.append(tokenizer.decode(ids[:target]))
    return out
