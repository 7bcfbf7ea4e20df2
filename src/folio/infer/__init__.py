"""Generation from a trained run: decoding with the model's cache, sampling, streamed text."""
