"""Watching runs: metrics.jsonl and console lines, nanoGPT log parsing, loss plots."""
