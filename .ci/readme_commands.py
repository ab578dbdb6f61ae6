"""Print the commands of README.md's first code block, one per line: what CI runs, so README and CI
cannot drift. The block must keep its shape: a fenced block before any other, holding exactly two
lines, each `make TARGET` with an optional `# comment`. Anything else exits 1 naming what is wrong.

    python3 .ci/readme_commands.py [README.md]
"""

import re
import sys

LINE = re.compile(r"^(make [A-Za-z0-9_.-]+)\s*(#.*)?$")


def readme_commands(text: str) -> list[str]:
    fence = re.search(r"^```[a-z]*\n(.*?)^```\s*$", text, re.MULTILINE | re.DOTALL)
    if fence is None:
        raise ValueError("no fenced code block (```) found")
    lines = [line.strip() for line in fence.group(1).splitlines() if line.strip()]
    if len(lines) != 2:
        raise ValueError(f"the first code block has {len(lines)} lines, expected 2 (make demo, make test): {lines}")
    commands = []
    for line in lines:
        match = LINE.match(line)
        if match is None:
            raise ValueError(f"the first code block's line {line!r} is not 'make TARGET  # comment'")
        commands.append(match.group(1))
    return commands


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "README.md"
    try:
        with open(path, encoding="utf-8") as f:
            commands = readme_commands(f.read())
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    print("\n".join(commands))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
