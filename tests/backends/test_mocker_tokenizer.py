"""Unit tests of the built-in and the tokenizer.json-based tokenizers (no processes)."""

from __future__ import annotations

import pytest

from dynamo.core.tokenizer import BuiltinTokenizer, HfTokenizer, TokenizerError, load_tokenizer


def test_builtin_round_trips_any_text():
    tok = BuiltinTokenizer()
    for text in ["hello world", "The quick brown fox!", "ünïcødé ✓ 🚀", "a\n\n  b\t", "", "<|im_start|>x"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("the world") == [tok.word_ids["the"], tok.word_ids[" world"]]


def test_builtin_generation_ids_are_in_vocab_and_non_empty():
    tok = BuiltinTokenizer()
    assert tok.generation_ids and tok.eos_token_id not in tok.generation_ids
    for t in tok.generation_ids:
        assert t < tok.vocab_size and tok.decode([t]) == tok.token_text[t] and tok.token_text[t].strip()
    ids = tok.generation_ids[:20]
    assert tok.decode(ids) == "".join(tok.token_text[t] for t in ids)


def test_builtin_chat_template_is_chatml_like():
    tok = BuiltinTokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_tokenizer_loads_template_and_generation_ids(model_dir):
    tok = load_tokenizer(model_dir)
    assert isinstance(tok, HfTokenizer)
    assert tok.eos_token_id == tok._tok.token_to_id("<|im_end|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "hello world"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert tok.generation_ids
    for t in tok.generation_ids[:50]:
        assert tok.token_text[t] and t < tok.vocab_size
    some = tok.generation_ids[:30]
    assert tok.decode(some) == "".join(tok.token_text[t] for t in some)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError):
        HfTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError):
        HfTokenizer(tmp_path)


def test_builtin_chunked_encoding_equals_encoding_the_whole_text():
    """Long texts are encoded chunk by chunk (cached); the ids must be exactly the same."""
    import random

    from dynamo.core.tokenizer import BuiltinTokenizer

    tok = BuiltinTokenizer()
    rng = random.Random(7)
    parts = ["the", " ", "  ", "\n", " quick", "42", "!?", "<|im_start|>", "<|im_end|>", "é", "\t", "x", ".", "ab "]
    for _ in range(200):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(200, 3000)))
        assert tok.encode(text) == tok._encode_text(text)
    shared = "".join(rng.choice(parts) for _ in range(3000))
    for tail in (" one", " two", "<|im_end|>", ""):  # prompts sharing a prefix reuse its cached chunks
        assert tok.encode(shared + tail) == tok._encode_text(shared + tail)
    assert tok.decode(tok.encode(shared)) == shared.replace("<|im_start|>", "").replace("<|im_end|>", "")
