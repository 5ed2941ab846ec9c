"""Loops of a SASS listing and the special-function (MUFU) instructions each one issues per element.

Used by benchmarks/mufu_report.py; pure text processing of `cuobjdump -sass` output, no CUDA needed.

Method. A loop is a backward branch: `BRA target` at address a with target < a spans [target, a].
Each instruction belongs to the innermost (shortest) loop containing it; a loop that contains
another one is an outer (row) loop and is not attributed per element. Per loop body the counter
records the MUFU instructions by kind (EX2, LG2, RCP, RSQ, SIN, ...), all its instructions (issue
slots: an FMA-pipe exp2 trades one MUFU for about a dozen of them), the global loads (LDG) and
stores (STG) and the shared-memory loads (LDS) with their widths, and whether it loads 64-bit
words (an i64 gather of top-k class indices). From that a loop's sweep is named:
  statistics  global loads, no global stores (the first sweep: maxima and sums of exponentials)
  gradient    global loads and stores (the second sweep: d loss / d s), or shared-memory loads and
              global stores (the second sweep over the packs a CUDA row cache kept on chip)
  zero-fill   global stores only (the gradient row of an ignored target)
  kept        64-bit loads (the k kept classes of the top-k teacher form; per row, not per column)
  merge       no global loads or stores (the cross-warp merge of statistics)
The caller supplies the elements one iteration processes per thread (from the loads' widths or
from the launch configuration); MUFU per element = MUFU in the body / elements per iteration.

Limits. It is a static count: every MUFU in the body counts once per iteration, also those
behind a branch taken rarely (the CUDA kernels' rescaling when a chunk raises the running
maximum), so the figure is an upper bound of the steady state (`conditional` reports the
MUFU under a predicate or a forward branch inside the body, an estimate of that part). Work
outside loops (per-row logs and reciprocals, the merges) is per row and not divided by C.
A compiler that changes the loop shape (software pipelining across iterations, a remainder
loop) keeps the ratio right as long as the loads and the MUFU of one iteration share a body.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
TARGET = re.compile(r"0x([0-9a-f]+)")
WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str
    opcode: str
    operands: str


@dataclass
class Loop:
    """One loop's body (instructions of nested loops excluded) and what it issues per iteration."""

    start: int
    end: int
    mufu: Dict[str, int] = field(default_factory=dict)  # kind (EX2, LG2, RCP, ...) -> count
    conditional_mufu: int = 0
    loads: List[int] = field(default_factory=list)  # bytes of each global load
    stores: List[int] = field(default_factory=list)
    shared_loads: List[int] = field(default_factory=list)  # bytes of each shared-memory load (LDS)
    instructions: int = 0  # issue slots per iteration (every instruction of the body, NOPs excepted)
    skippable_instructions: int = 0  # of which between a predicated forward branch and its target
    outer: bool = False

    @property
    def mufu_total(self) -> int:
        return sum(self.mufu.values())

    @property
    def sweep(self) -> str:
        if self.outer:
            return "row"
        if 8 in self.loads:
            return "kept"
        if self.loads:
            return "gradient" if self.stores else "statistics"
        if self.stores:  # a gradient sweep over packs a row cache kept in shared memory, or a zero-fill
            return "gradient" if self.shared_loads else "zero-fill"
        return "merge"

    def widest_bytes(self, stores: bool = False) -> int:
        """Bytes moved per iteration by the widest loads (stores): the row streams' packs, read from
        global memory or, for a gradient sweep over a row cache, from shared memory."""
        sizes = self.stores if stores else (self.loads or (self.shared_loads if self.stores else []))
        return max(sizes) * sizes.count(max(sizes)) if sizes else 0


def parse_functions(sass: str) -> Dict[str, List[Instruction]]:
    """The instructions of every function of a `cuobjdump -sass` listing, by (mangled) name."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in sass.splitlines():
        if match := FUNCTION.search(line):
            current = functions.setdefault(match[1], [])
        elif current is not None and (match := INSTRUCTION.search(line)):
            current.append(Instruction(int(match[1], 16), match[2] or "", match[3], match[4].strip()))
    return functions


def access_bytes(opcode: str, unit: str) -> int:
    """Width in bytes of a global load (unit "LDG"), store ("STG") or shared-memory load ("LDS")
    opcode, 0 for anything else."""
    parts = opcode.split(".")
    if parts[0] != unit:
        return 0
    return next((WIDTHS[p] for p in reversed(parts[1:]) if p in WIDTHS), 4)


def find_loops(instructions: List[Instruction]) -> List[Loop]:
    """Every loop (backward branch) with its own body's MUFU, loads and stores."""
    spans = set()
    for ins in instructions:
        if ins.opcode.startswith("BRA") and (target := TARGET.search(ins.operands)):
            start = int(target[1], 16)
            if start < ins.address:
                spans.add((start, ins.address))
    loops = [Loop(start, end) for start, end in sorted(spans)]
    for loop in loops:
        loop.outer = any(o is not loop and loop.start <= o.start and o.end <= loop.end for o in loops)
    skips = forward_skips(instructions)
    for ins in instructions:
        inside = [lp for lp in loops if lp.start <= ins.address <= lp.end]
        if not inside:
            continue
        loop = min(inside, key=lambda lp: lp.end - lp.start)
        loop.instructions += ins.opcode != "NOP"
        skippable = any(lo < ins.address < hi and loop.start <= lo and hi <= loop.end for lo, hi in skips)
        loop.skippable_instructions += skippable and ins.opcode != "NOP"
        if ins.opcode.startswith("MUFU."):
            kind = ins.opcode.split(".")[1]
            loop.mufu[kind] = loop.mufu.get(kind, 0) + 1
            loop.conditional_mufu += bool(ins.predicate) or skippable
        elif size := access_bytes(ins.opcode, "LDG"):
            loop.loads.append(size)
        elif size := access_bytes(ins.opcode, "STG"):
            loop.stores.append(size)
        elif size := access_bytes(ins.opcode, "LDS"):
            loop.shared_loads.append(size)
    return loops


def forward_skips(instructions: List[Instruction]) -> List[tuple]:
    """(branch, target) of each predicated forward branch: the instructions between them may be skipped."""
    skips = []
    for ins in instructions:
        if ins.opcode.startswith("BRA") and ins.predicate and (target := TARGET.search(ins.operands)):
            if int(target[1], 16) > ins.address:
                skips.append((ins.address, int(target[1], 16)))
    return skips


def mufu_outside_loops(instructions: List[Instruction], loops: List[Loop]) -> Dict[str, int]:
    """MUFU by kind in no loop: once per launch or per row."""
    counts: Dict[str, int] = collections.Counter()
    for ins in instructions:
        if ins.opcode.startswith("MUFU.") and not any(lp.start <= ins.address <= lp.end for lp in loops):
            counts[ins.opcode.split(".")[1]] += 1
    return dict(counts)


def instructions_outside_loops(instructions: List[Instruction], loops: List[Loop]) -> int:
    """Instructions (NOPs excepted) in no loop."""
    return sum(1 for i in instructions if i.opcode != "NOP" and not any(lp.start <= i.address <= lp.end for lp in loops))
