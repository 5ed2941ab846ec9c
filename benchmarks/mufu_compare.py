"""Compares two mufu_report.py JSON outputs (before, after): per kernel, sweep and loop width, the range of the
change in MUFU and in instructions per element (static, and outside branches a chunk can skip, e.g. a rescale
taken only when a maximum grows), and the rows of the variants given by --show.

    python benchmarks/mufu_compare.py BEFORE/mufu_report.json AFTER/mufu_report.json --show "512 thr" bfloat16
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List


def load(path: str) -> Dict[str, dict]:
    with open(path) as handle:
        return {row["key"]: row for row in json.load(handle)["rows"]}


def span(values: List[float]) -> str:
    return f"{min(values):+.2f} .. {max(values):+.2f} (mean {sum(values) / len(values):+.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--show", nargs="*", default=[], help="print the rows whose key contains every one of these")
    args = parser.parse_args(argv)
    before, after = load(args.before), load(args.after)
    common = sorted(set(before) & set(after))
    print(f"rows: {len(before)} before, {len(after)} after, {len(common)} in both")
    groups = defaultdict(list)
    for key in common:
        b, a = before[key], after[key]
        groups[(b["backend"], b["kernel"], b["sweep"], b["elements"])].append((b, a))
    print("\n| backend | kernel | sweep | elements/iter/thread | rows | MUFU/element change | instructions/element "
          "change | not skippable |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (backend, kernel, sweep, elements), pairs in sorted(groups.items()):
        mufu = [a["per_element"] - b["per_element"] for b, a in pairs]
        instructions = [a["instructions_per_element"] - b["instructions_per_element"] for b, a in pairs]
        unskipped = [a["unskipped_instructions_per_element"] - b["unskipped_instructions_per_element"] for b, a in pairs]
        print(f"| {backend} | {kernel} | {sweep} | {elements:g} | {len(pairs)} | {span(mufu)} | {span(instructions)} | "
              f"{span(unskipped)} |")
    if args.show:
        print("\n| row | MUFU/element | instructions/element | not skippable |")
        print("| --- | --- | --- | --- |")
        for key in common:
            if all(part in key for part in args.show):
                b, a = before[key], after[key]
                print(f"| {key} | {b['per_element']:.3f} -> {a['per_element']:.3f} | "
                      f"{b['instructions_per_element']:.2f} -> {a['instructions_per_element']:.2f} | "
                      f"{b['unskipped_instructions_per_element']:.2f} -> {a['unskipped_instructions_per_element']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
