"""Tokenizers. Importing any module of this package registers every built-in tokenizer class with
`BaseTokenizer.registry`, so `BaseTokenizer.load` finds the saved class whatever was imported first, and adds
every `BPETokenizer` method (training, file formats, chat templates) to the class. Jinja is imported only when a
chat template is rendered."""
from . import base_tokenizer, bpe_tokenizer, char_tokenizer, hf_tokenizer   # noqa: F401  (imported for their registration)
from . import bpe_training, byte_alphabet, chat_templates, tokenizer_files   # noqa: F401  (they @patch BPETokenizer)
