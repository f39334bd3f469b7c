"""The README's demo tables are the check's output, never typed by hand.

    python demo/run.py --check --seeds 3 --markdown --logdir D > tables.md
    python scripts/readme_tables.py --write tables.md      # put them into README.md
    python scripts/readme_tables.py --compare tables.md    # exit 1 if README.md says otherwise
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
    if block == tables:
        print("README.md's demo tables match the check's output")
        return 0
    sys.stdout.writelines(difflib.unified_diff(block.splitlines(True), tables.splitlines(True),
                                               "README.md", "check output"))
    print("\nREADME.md's demo tables differ from what the check prints on a fresh run (diff above)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
