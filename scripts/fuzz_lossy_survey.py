"""Exploration run of ``tests/test_fuzz_lossy.py``: many examples per (scheme, target), counted.

The pytest run stops a (scheme, target) at its first failure; this one keeps going and counts.
Each (scheme, target) runs in its own process, so a segfault ends only that process: the driver
counts the example it died on (the log's "started" line without an outcome) and starts the
process again with another seed for the examples left. Then it prints, per (scheme, target):
examples, within budget, refused (by reason), crashes, silent divergences and other breakage.

    python scripts/fuzz_lossy_survey.py --examples 20 --seed 1 --log /tmp/survey.jsonl
    python scripts/fuzz_lossy_survey.py --summary /tmp/survey.jsonl   # only count an existing log
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
import zlib
sys.path.insert(0, "tests")
from hypothesis import HealthCheck, Phase, given, settings, seed
from hypothesis import strategies as st
import test_fuzz_lossy as fuzz

@seed({seed})
@settings(max_examples={examples}, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(program=fuzz.lossy_programs(), budget_draw=st.integers(0, 2), calibrate=st.booleans(), variant=st.integers(0, 3))
def explore(program, budget_draw, calibrate, variant):
    try:
        fuzz.check_lossy(program, {scheme!r}, {target!r}, budget_draw, calibrate, variant)
    except Exception:
        pass  # check_lossy logged the outcome; keep exploring

explore()
"""


def _entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _finished(log: Path, scheme: str, target: str) -> tuple[int, int]:
    """(examples with an outcome, examples that started but have none: the process died) for one pair."""
    done = open_ = 0
    for entry in _entries(log):
        if (entry["scheme"], entry["target"]) != (scheme, target):
            continue
        if entry["outcome"] == "started":
            open_ += 1
        else:
            open_ -= 1
            done += 1
    died = max(open_, 0)
    return done, died


def explore(scheme: str, target: str, examples: int, seed: int, log: Path) -> None:
    """Run ``examples`` examples of one (scheme, target), restarting the process after a crash."""
    attempt = 0
    while True:
        done, died = _finished(log, scheme, target)
        left = examples - done - died
        if left <= 0 or attempt > examples:
            return
        # each scheme its own programs (the same for both targets, so they compare), another seed per restart
        child_seed = seed * 100_000 + zlib.crc32(scheme.encode()) % 10_000 + 10_000 * attempt
        code = CHILD.format(seed=child_seed, examples=left, scheme=scheme, target=target)
        env = {**os.environ, "GRAPHOPT_FUZZ_LOSSY_LOG": str(log), "GRAPHOPT_ON_ERROR": "raise"}
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"  {scheme} on {target}: process ended with {result.returncode}", flush=True)
        attempt += 1


def _reason(message: str) -> str:
    """A refusal message with its numbers and names blanked, so equal reasons count together."""
    text = re.sub(r"'[^'\s]*'", "'…'", message.splitlines()[0])
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:170]


def summarize(log: Path) -> None:
    """Print the counts per (scheme, target) and the distinct reasons of refusals and failures."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    details: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    open_: dict[tuple[str, str, str, float | None], int] = collections.Counter()
    for entry in _entries(log):
        pair = (entry["scheme"], entry["target"])
        key = (*pair, entry["program"], entry["budget"])
        if entry["outcome"] == "started":
            open_[key] += 1
            continue
        open_[key] -= 1
        counts[pair][entry["outcome"]] += 1
        counts[pair]["examples"] += 1
        if entry.get("avoided"):
            counts[pair]["known crash avoided"] += 1
        if entry["outcome"] in ("refused", "crash"):
            details[pair][f"{entry['outcome']}: {entry['error']}: {_reason(entry['message'])}"] += 1
        elif entry["outcome"] in ("divergence", "broken"):
            details[pair][f"{entry['outcome']}: {'; '.join(entry['problems'])[:300]}"] += 1
    for (scheme, target, *_), n in open_.items():
        if n > 0:
            counts[(scheme, target)]["process crash"] += n
            counts[(scheme, target)]["examples"] += n
    for pair in sorted(counts):
        c = counts[pair]
        print(f"{pair[0]:17s} {pair[1]:5s} examples {c['examples']:3d}  ok {c['ok']:3d}  refused {c['refused']:3d}  "
              f"crash {c['crash'] + c['process crash']:3d}  divergence {c['divergence']:3d}  broken {c['broken']:3d}"
              + (f"  (known crash avoided: {c['known crash avoided']})" if c["known crash avoided"] else ""))
        for text, n in details[pair].most_common():
            print(f"    {n:3d} x {text}")


def main() -> None:
    """Explore, then summarize (or only summarize with ``--summary``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10, help="examples per (scheme, target)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log", type=Path, default=Path("fuzz_lossy_survey.jsonl"))
    parser.add_argument("--schemes", default=None, help="comma-separated; default: every scheme")
    parser.add_argument("--targets", default="cpu,onnx")
    parser.add_argument("--summary", type=Path, default=None, help="only summarize this log")
    args = parser.parse_args()
    if args.summary:
        summarize(args.summary)
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_fuzz_lossy import SCHEMES

    schemes = args.schemes.split(",") if args.schemes else list(SCHEMES)
    for scheme in schemes:
        for target in args.targets.split(","):
            print(f"{scheme} on {target}...", flush=True)
            explore(scheme, target, args.examples, args.seed, args.log)
    summarize(args.log)


if __name__ == "__main__":
    main()
