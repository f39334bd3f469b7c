"""The README's demo tables are the check's output, never typed by hand.

    python demo/run.py --check --seeds 3 --markdown --logdir D1 --logdir D2 --label ... > tables.md
    python scripts/readme_tables.py --write tables.md      # put them into README.md
    python demo/run.py --check --seeds 3 --markdown --logdir D > fresh.md
    python scripts/readme_tables.py --compare fresh.md     # exit 1 if README.md says otherwise

``--compare`` holds a fresh run's tables against the README's row by row (the headers
name the logdirs and may differ): every row must print the same figures and hold on the
same share of runs (the README's runs may be the fresh seeds under several CPU code
paths), except rows marked (†) (figures that vary with the CPU code path), where only a
verdict that the README states for all its runs ("reproduced" or "NOT reproduced") must
be the fresh one too.
"""

import argparse
import difflib
import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN = "<!-- demo-check:begin (written by scripts/readme_tables.py from the check's output) -->"
END = "<!-- demo-check:end -->"


def split(text: str):
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    return head, block.strip("\n"), tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="TABLES")
    mode.add_argument("--compare", metavar="TABLES")
    args = parser.parse_args(argv)
    with open(args.write or args.compare, encoding="utf-8") as f:
        tables = f.read().strip("\n")
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, block, tail = split(text)
    if args.write:
        with open(README, "w", encoding="utf-8") as f:
            f.write(f"{head}{BEGIN}\n{tables}\n{END}{tail}")
        return 0
    problems = compare(block, tables)
    if not problems:
        print("README.md's demo tables match the check's output")
        return 0
    for problem in problems:
        print(problem)
    sys.stdout.writelines(difflib.unified_diff(block.splitlines(True), tables.splitlines(True),
                                               "README.md", "check output"))
    print("\nREADME.md's demo tables differ from what the check prints on a fresh run (above)", file=sys.stderr)
    return 1


INEXACT = " (†)"


def _rows(text: str):
    """``[(relation, measured, verdict)]`` of every table row (headers and rules skipped)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or set(cells[1]) <= set("-") or cells[1].startswith("measured"):
            continue
        rows.append(tuple(cells))
    return rows


def _share(verdict: str):
    """A verdict as the fraction of runs where the relation held (None: no verdict),
    and whether it is claimed: "4 of 6 runs" and "2 of 3 runs" say the same."""
    claimed = "(claimed)" in verdict
    verdict = verdict.replace("(claimed)", "").strip()
    if not verdict:
        return None, claimed
    if verdict == "reproduced":
        return 1.0, claimed
    if verdict == "NOT reproduced":
        return 0.0, claimed
    held, _, total = verdict.replace(" runs", "").partition(" of ")
    return int(held) / int(total), claimed


def compare(readme: str, fresh: str):
    expected, got = _rows(readme), _rows(fresh)
    if [r[0] for r in expected] != [r[0] for r in got]:
        return ["the tables do not have the same rows"]
    problems = []
    for (relation, measured, verdict), (_, fresh_measured, fresh_verdict) in zip(expected, got):
        if not relation.endswith(INEXACT):
            if measured != fresh_measured or _share(verdict) != _share(fresh_verdict):
                problems.append(f"{relation}: README {measured!r} {verdict!r}, fresh run {fresh_measured!r} {fresh_verdict!r}")
            continue
        stated = verdict.replace("(claimed)", "").strip()
        if stated in ("reproduced", "NOT reproduced") and fresh_verdict.replace("(claimed)", "").strip() != stated:
            problems.append(f"{relation}: README {stated!r} on all its runs, fresh run {fresh_verdict!r}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
