"""Tokenizers shared by the frontend (routing) and the mocker (serving): the same ids on both sides.

``load_tokenizer(path)`` gives a tokenizer.json + chat template from a model directory, or the
built-in deterministic tokenizer when ``path`` is None.
"""

from dynamo.backends.mocker.tokenizer import BuiltinTokenizer, HfTokenizer, TokenizerError, load_tokenizer

__all__ = ["BuiltinTokenizer", "HfTokenizer", "TokenizerError", "load_tokenizer"]
