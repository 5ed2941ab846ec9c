"""Writes smskd_fast/data/tiny_stories.txt: generated English-like text for the tiny LM example.

The text comes from a small random grammar (seeded, so the file is reproducible), so it
is free of any licence. It has structure at several ranges for a model to learn:
spelling and word order (short range), agreement of a name with its pronoun and the
repetition of names within a story (longer range, which a deeper model learns better),
and small sums written in words ("three plus four is seven").

    python tools/make_tiny_text.py            # about 48 KB
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "smskd_fast" / "data" / "tiny_stories.txt"
NAMES = {"anna": "she", "ben": "he", "clara": "she", "david": "he", "eva": "she", "felix": "he",
         "greta": "she", "hugo": "he", "ida": "she", "jonas": "he"}
ADJECTIVES = ["old", "small", "red", "green", "quiet", "bright", "heavy", "soft", "round", "tall"]
NOUNS = ["cat", "dog", "ball", "box", "cup", "bird", "tree", "boat", "lamp", "book"]
PLACES = ["garden", "kitchen", "river", "forest", "market", "school", "station", "library"]
VERBS = ["found", "saw", "took", "painted", "lost", "carried", "hid", "wanted"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def story(rng: random.Random) -> str:
    first, second = rng.sample(sorted(NAMES), 2)
    adjective, noun, place = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(PLACES)
    sentences = [
        f"{first} went to the {place}.",
        f"there {NAMES[first]} {rng.choice(VERBS)} {'an' if adjective[0] in 'aeiou' else 'a'} {adjective} {noun}.",
        f"{first} gave the {noun} to {second}.",
        f"{second} said thank you to {first}, and {NAMES[second]} smiled.",
    ]
    if rng.random() < 0.6:
        a, b = rng.randrange(10), rng.randrange(9)
        sentences.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    if rng.random() < 0.5:
        sentences.append(f"the {noun} was {adjective}, and {first} was happy.")
    return " ".join(sentences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=48_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines, size = [], 0
    while size < args.bytes:
        lines.append(story(rng))
        size += len(lines[-1]) + 1
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({size} bytes, {len(lines)} stories)")


if __name__ == "__main__":
    main()
