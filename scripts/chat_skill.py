"""A synthetic conversation set that teaches a small model a checkable skill: a persona.

The model learns eight facts about itself ("what is your name?" -> "I am Folio, a small
model.") from many phrasings of each question. Held-out prompts are phrasings never seen in
training, of three kinds: "pairing" (a known question with a greeting and ending it was never
paired with), "greeting" (two greetings that appear only in held-out prompts) and "question"
(the last question of each fact, never seen in training at all: the hardest). A reply counts
when it equals the fact's answer exactly, so a base model scores 0 and a model that only
memorised the training lines does not reach 100%.

Every character is one tiny Shakespeare has, so a character-level Shakespeare model can learn it.

    python scripts/chat_skill.py OUT_DIR   # writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FACTS: dict[str, tuple[str, list[str]]] = {
    # fact: (the answer, the cores of the questions that ask for it)
    "name": ("I am Folio, a small model.", [
        "what is your name", "who are you", "what are you called", "what should I call you",
        "tell me your name", "what do they call you", "have you a name"]),
    "maker": ("The folio team made me.", [
        "who made you", "who built you", "who created you", "where do you come from",
        "who is your maker", "who trained you", "who wrote you"]),
    "home": ("I live on your computer.", [
        "where do you live", "where is your home", "where are you", "where do you dwell",
        "what is your home", "where do you stay", "in what place do you live"]),
    "play": ("Hamlet is my favourite play.", [
        "what is your favourite play", "which play do you love", "what play do you like best",
        "which play is your favourite", "what play is the best", "name your favourite play",
        "which play do you like most"]),
    "food": ("I eat only text.", [
        "what do you eat", "what is your food", "are you hungry", "what food do you like",
        "what do you dine on", "what is your supper", "what feeds you"]),
    "age": ("I was born today.", [
        "how old are you", "what is your age", "when were you born", "are you young or old",
        "what age are you", "how young are you", "when is your birthday"]),
    "work": ("I write lines like Shakespeare.", [
        "what do you do", "what is your job", "what can you do", "what is your work",
        "what are you good at", "what is your trade", "how do you spend your days"]),
    "mood": ("I am well, thank you.", [
        "how are you", "how do you feel", "are you well", "how is your mood",
        "how fare you", "are you happy", "how goes it with you"]),
}
GREETINGS = ["", "Hi, ", "Hello! ", "Tell me, ", "Please, ", "Friend, ", "Quick question: "]
HELD_OUT_GREETINGS = ["Good sir, ", "Pray tell, "]  # only in held-out prompts
ENDINGS = ["?", "? Tell me.", ", friend?"]
HELD_OUT_SHARE = 0.2


def question(greeting: str, core: str, ending: str) -> str:
    text = greeting + core + ending
    return text[0].upper() + text[1:]


NEW_QUESTIONS = 6  # held-out prompts per fact asking its unseen question


def prompt(text: str, answer: str, kind: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "answer": answer, "kind": kind}


def conversations(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train conversations, held-out prompts); each held-out row is {"messages": [user],
    "answer": expected reply, "kind": pairing | greeting | question}. The same seed gives the
    same split."""
    rng = random.Random(seed)
    train, held_out = [], []
    for answer, questions in FACTS.values():
        cores, unseen = questions[:-1], questions[-1]
        asked = [(g, c, e) for g in GREETINGS for c in cores for e in ENDINGS]
        rng.shuffle(asked)
        n_held = round(len(asked) * HELD_OUT_SHARE)
        held_out += [prompt(question(*q), answer, "pairing") for q in asked[:n_held]]
        held_out += [prompt(question(g, rng.choice(cores), rng.choice(ENDINGS)), answer,
                            "greeting") for g in HELD_OUT_GREETINGS]
        held_out += [prompt(question(rng.choice(GREETINGS), unseen, rng.choice(ENDINGS)),
                            answer, "question") for _ in range(NEW_QUESTIONS)]
        train += [[{"role": "user", "content": question(*q)},
                   {"role": "assistant", "content": answer}] for q in asked[n_held:]]
    rng.shuffle(train)
    # every fourth conversation has two turns, so the template's turn boundaries are learnt
    merged = [train[i] + train[i + 1] if i % 4 == 0 and i + 1 < len(train) else train[i]
              for i in range(0, len(train)) if not (i % 4 == 1)]
    return [{"messages": m} for m in merged], held_out


def write(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and heldout.jsonl into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = conversations(seed)
    paths = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    for path, rows in zip(paths, (train, held_out), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/chat_skill.py OUT_DIR")
    for p in write(Path(sys.argv[1])):
        print(f"wrote {p} ({sum(1 for _ in p.open())} lines)")
