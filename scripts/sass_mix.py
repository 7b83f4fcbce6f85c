#!/usr/bin/env python3
"""The static instruction mix of the kernels in `cuobjdump -sass` output (read from stdin).

For every kernel it prints the whole function's mix and that of each loop holding tensor-core
(HMMA) or FMA work, innermost first: a loop is the address range from a backward branch's
target to the branch. Counted opcodes: HMMA (tensor core), MUFU (exponentials, logarithms),
FFMA/FMUL/FADD (FP32 pipe), LDS and LDSM (shared loads, ldmatrix), LDGSTS (cp.async), LDG, BAR,
and all instructions. `--require-hmma PREFIX` fails (exit 1) unless every kernel whose name
starts with PREFIX holds HMMA instructions, and `--forbid-hmma PREFIX` unless none of those
does.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)\s*(.*?);")
BRANCH_TARGET = re.compile(r"^(0x[0-9a-f]+)")
COLUMNS = ["HMMA", "MUFU", "FFMA", "FMUL", "FADD", "LDS", "LDSM", "LDGSTS", "LDG", "BAR", "all"]


def parse(lines):
    """{kernel: [(address, opcode, operands)]} in address order."""
    kernels: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in lines:
        match = FUNCTION.match(line)
        if match:
            current = kernels.setdefault(match.group(1), [])
            continue
        match = INSTRUCTION.match(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(3), match.group(5)))
    return kernels


def mix(instructions) -> Counter:
    counts = Counter(opcode for _, opcode, _ in instructions)
    counts["all"] = len(instructions)
    return counts


def loops(instructions):
    """(first, last) address ranges of the loops closed by backward branches."""
    found = []
    for address, opcode, operands in instructions:
        if opcode != "BRA":
            continue
        target = BRANCH_TARGET.match(operands)
        if target and int(target.group(1), 16) <= address:
            found.append((int(target.group(1), 16), address))
    return found


def row(name: str, counts: Counter) -> str:
    return f"{name:<44}" + "".join(f"{counts.get(c, 0):>8}" for c in COLUMNS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="", help="a label for the table (the SASS architecture)")
    parser.add_argument("--require-hmma", action="append", default=[], metavar="PREFIX")
    parser.add_argument("--forbid-hmma", action="append", default=[], metavar="PREFIX")
    args = parser.parse_args()
    kernels = parse(sys.stdin)
    if not kernels:
        print("sass_mix: no kernels in the input", file=sys.stderr)
        return 1
    print(f"static instruction mix {args.arch}".rstrip())
    print(f"{'kernel / loop (addresses)':<44}" + "".join(f"{c:>8}" for c in COLUMNS))
    failures = []
    for name in sorted(kernels):
        instructions = kernels[name]
        whole = mix(instructions)
        print(row(name, whole))
        spans = sorted(loops(instructions), key=lambda span: span[1] - span[0])
        for first, last in spans:
            body = mix([i for i in instructions if first <= i[0] <= last])
            if body["HMMA"] or body["FFMA"] >= 16:
                print(row(f"  loop {first:#06x}-{last:#06x}", body))
        has_hmma = whole["HMMA"] > 0
        if any(name.startswith(p) for p in args.require_hmma) and not has_hmma:
            failures.append(f"{name} has no HMMA instruction")
        if any(name.startswith(p) for p in args.forbid_hmma) and has_hmma:
            failures.append(f"{name} has HMMA instructions")
    for failure in failures:
        print(f"sass_mix: {args.arch}: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
