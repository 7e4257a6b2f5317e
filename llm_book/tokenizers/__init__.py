"""Tokenizers. Importing any module of this package registers every built-in tokenizer class with
`BaseTokenizer.registry`, so `BaseTokenizer.load` finds the saved class whatever was imported first."""
from . import base_tokenizer, bpe_tokenizer, char_tokenizer   # noqa: F401  (imported for their registration)
