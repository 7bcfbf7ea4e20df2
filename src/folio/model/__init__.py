"""The GPT: one forward pass for training, evaluation and cached decoding, and its kernels."""
