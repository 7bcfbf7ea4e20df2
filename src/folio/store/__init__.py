"""The run directory and the formats folio reads and writes: folio, nanoGPT, Hugging Face."""
