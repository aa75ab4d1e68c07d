"""all-MiniLM-L6-v2 pruned (or weight-only quantized) by graphopt, judged on held-out sentences.

Each setting prunes the real model (mean-pooled, batch 8 x 128 tokens) with calibration on the
first ``--calibration`` sentences of ``pydoc_data.topics`` (padded to 128 tokens), optionally
distills on the first 1280 (padded per batch), and compares the embeddings of the last 128
sentences, which nothing trained or calibrated on, with the original's: worst and mean cosine,
and Spearman's rho of the pairwise similarities; then the same on the zoo's 8 everyday sentences
(``graphopt bench``'s example inputs: another domain than the documentation prose).

    python scripts/prune_minilm_heldout.py --amounts 0.5,0.3 --importance taylor,fluctuation --refit both
    python scripts/prune_minilm_heldout.py --amounts 0.5 --importance fluctuation --distill-lr 1e-4,5e-4

``--weight-only 4:32,4:128`` quantizes instead (bits:group, each with ``--rounding nearest,gptq``),
calibrated on the same sentences. ``--text mix`` calibrates on half pydoc sentences, half
pseudo-sentences (6-20 random whole words of the vocabulary), ``--text pseudo`` on pseudo-sentences
alone. With ``--weight-only`` or ``--text``, the first calibration batch is the example inputs, so
the everyday sentences stay held out too (otherwise they are the example, as in the runs
docs/pruning.md's refit table came from: one batch among the calibration's).

    python scripts/prune_minilm_heldout.py --amounts 0.1 --scope cost --text pydoc,mix,pseudo
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

import graphopt
from graphopt import Prune
from graphopt.bench import zoo
from graphopt.bench.compound import distill_data, pydoc_sentences

HELD_OUT = 128


def _padded(tokenizer, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for start in range(0, len(sentences) - 7, 8):
        tokens = tokenizer(sentences[start:start + 8], padding="max_length", truncation=True, max_length=128,
                           return_tensors="pt")
        batches.append((tokens["input_ids"], tokens["attention_mask"]))
    return batches


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def fidelity(model, held_out, reference: torch.Tensor, everyday, everyday_reference: torch.Tensor) -> str:
    """Worst and mean cosine to ``reference`` and Spearman's rho of pairwise similarities; worst on ``everyday``."""
    with torch.no_grad():
        embeddings = torch.cat([model(*batch) for batch in held_out])
        other = F.cosine_similarity(model(*everyday), everyday_reference).min()
    cosines = F.cosine_similarity(embeddings, reference)

    def similarities(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        upper = torch.triu_indices(len(x), len(x), 1)
        return (x @ x.T)[upper[0], upper[1]]

    rho = torch.corrcoef(torch.stack([_ranks(similarities(embeddings)), _ranks(similarities(reference))]))[0, 1]
    return f"worst {cosines.min():.4f} mean {cosines.mean():.4f} rho {rho:.4f}; everyday worst {other:.4f}"


def main() -> None:
    """Run every requested setting and print its held-out fidelity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amounts", default="0.5")
    parser.add_argument("--importance", default="fluctuation")
    parser.add_argument("--refit", choices=("default", "both"), default="default",
                        help="both: each importance sliced and refit")
    parser.add_argument("--scope", default="local", choices=("local", "global", "cost"))
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences")
    parser.add_argument("--distill-lr", default="", help="comma-separated learning rates; empty: no distillation")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--weight-only", default="", help="bits:group settings, e.g. 4:32,4:128; no pruning then")
    parser.add_argument("--rounding", default="nearest,gptq")
    parser.add_argument("--text", default="", help="calibration texts to compare: pydoc, mix, pseudo (comma-separated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, example, _ = zoo._build_minilm("full", 8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.minilm_path(), local_files_only=True)
    sentences = pydoc_sentences()
    calibration = _padded(tokenizer, sentences[:args.calibration])
    held_out = _padded(tokenizer, sentences[-HELD_OUT:])
    with torch.no_grad():
        reference = torch.cat([model(*batch) for batch in held_out])
        everyday = model(*example)
    checks = (held_out, reference, example, everyday)
    if args.weight_only:
        _weight_only(model, args, calibration, checks)
        return
    if args.text:
        _calibration_texts(model, args, tokenizer, sentences, checks)
        return
    training = distill_data(example, count=1280) if args.distill_lr else []
    for amount in (float(a) for a in args.amounts.split(",")):
        for importance in args.importance.split(","):
            for refit in ((False, True) if args.refit == "both" else (None,)):
                started = time.perf_counter()
                pruned = graphopt.optimize(model, example, "cpu", calibration=calibration,
                                           prune=Prune(amount, importance=importance, refit=refit, scope=args.scope))
                label = (f"{amount:g} {importance} {args.scope}"
                         + ("" if refit is None else (" refit" if refit else " sliced")))
                print(f"{label}: {fidelity(pruned, *checks)} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                for lr in (float(v) for v in args.distill_lr.split(",") if v):
                    started = time.perf_counter()
                    recovered = graphopt.distill(pruned, teacher=model, data=training, epochs=args.distill_epochs,
                                                 loss="cosine", lr=lr)
                    print(f"{label} + distill lr {lr:g}: {fidelity(recovered, *checks)} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)


def _pseudo_sentences(tokenizer, count: int, rng: random.Random) -> list[str]:
    """Sentences of 6-20 random lower-case whole words (3 letters or more) of ``tokenizer``'s vocabulary."""
    words = [w for w, i in tokenizer.vocab.items() if w.isalpha() and w.islower() and len(w) > 2 and i > 1996]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))).capitalize() + "." for _ in range(count)]


def _calibration_texts(model, args, tokenizer, sentences: list[str], checks) -> None:
    """Each ``--amounts`` ratio calibrated on each of ``--text``'s texts (the everyday sentences held out)."""
    for text in args.text.split(","):
        rng = random.Random(0)
        half = args.calibration // 2
        if text == "pydoc":
            chosen = sentences[:args.calibration]
        elif text == "mix":
            chosen = sentences[:half] + _pseudo_sentences(tokenizer, args.calibration - half, rng)
            rng.shuffle(chosen)
        else:
            chosen = _pseudo_sentences(tokenizer, args.calibration, rng)
        calibration = _padded(tokenizer, chosen)
        for amount in (float(a) for a in args.amounts.split(",")):
            started = time.perf_counter()
            pruned = graphopt.optimize(model, calibration[0], "cpu", calibration=calibration[1:],
                                       prune=Prune(amount, importance=args.importance, scope=args.scope))
            print(f"{text} {amount:g} {args.importance} {args.scope}: {fidelity(pruned, *checks)} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


def _weight_only(model, args, calibration, checks) -> None:
    """Each ``bits:group`` setting with each rounding, calibrated on ``calibration`` (its first batch the example)."""
    for setting in args.weight_only.split(","):
        bits, group = (int(v) for v in setting.split(":"))
        for rounding in args.rounding.split(","):
            started = time.perf_counter()
            scheme = graphopt.WeightOnly(bits=bits, group_size=group, rounding=rounding)
            quantized = graphopt.optimize(model, calibration[0], "cpu", calibration=calibration[1:], quantize=scheme,
                                          fidelity=graphopt.Fidelity(enforce=False))
            print(f"int{bits} group {group} {rounding}: {fidelity(quantized, *checks)} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
