"""Text in, token files out: sources, tokenizers, `prepare`, and the batch loader."""
