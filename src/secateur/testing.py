"""Tiny random models of every supported family, built in-process (no files, no hub).

    model = secateur.testing.tiny_model("llama")            # random weights, seed 0
    model, tokenizer = secateur.testing.tiny_model("bert", with_tokenizer=True)

They are small enough that a test builds, compresses and evaluates one in well under a second.
``timing_model()`` builds the P4 timing model (random Llama, hidden 768, 12 layers).
"""

from __future__ import annotations

from typing import Any

from .errors import SecateurError, one_of

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")
VOCAB = 128


def _config(family: str) -> Any:
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                             eos_token_id=2, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, pad_token_id=0, **common)
    raise SecateurError(f"unknown tiny model family '{family}'; valid families: {one_of(FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0, with_tokenizer: bool = False) -> Any:
    """A randomly initialised model of ``family`` with two blocks of width 32, in eval mode."""
    import torch
    import transformers as tf

    config = _config(family)
    torch.manual_seed(seed)
    cls = tf.BertModel if family == "bert" else tf.AutoModelForCausalLM
    model = cls(config) if cls is tf.BertModel else cls.from_config(config)
    model.eval()
    if with_tokenizer:
        return model, tiny_tokenizer(family)
    return model


def tiny_tokenizer(family: str = "llama") -> Any:
    """A word-level tokenizer over a 128-symbol vocabulary (bytes of lowercase text and specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<s>", "</s>", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars[: VOCAB - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", 4), ("[SEP]", 5)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]")


def timing_model(seed: int = 0) -> Any:
    """The P4 timing model: random Llama, hidden 768, intermediate 2048, 12 layers, 12 heads, vocab 32000."""
    import torch
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """Run ``secateur ARGS...`` in-process under pytest's ``capsys``: (exit code, stdout, stderr)."""
    import pytest

    from .cli import main

    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err
