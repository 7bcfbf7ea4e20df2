"""folio: train small GPT language models on the computer you have."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "generate", "reply"]


def __getattr__(name: str):
    # Keep `import folio` light: torch is imported only when the API is used.
    if name == "load":
        from folio.infer.sample import load
        return load
    if name == "generate":
        from folio.infer.sample import generate
        return generate
    if name == "reply":  # a chat run's next turn after a list of messages
        from folio.infer.chat import reply
        return reply
    raise AttributeError(name)
