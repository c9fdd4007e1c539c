"""Tokenizers: the `Tokenizer` protocol, the byte tokenizer, a Hugging Face tokenizer.json reader
(`HFTokenizer`), and the tokenizer files every checkpoint carries."""
