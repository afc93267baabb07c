"""Print the shell commands of one README section's code blocks, one per line, as printed there.

    python3 .ci/readme_commands.py "Install and test"      # what .ci/run installs and tests with

Comment lines and blank lines are left out; a `console` block (illustrative, with prompts) is not
a command block. tests/test_readme.py runs the Quickstart's blocks through this same reader.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(text: str, title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if found is None:
        raise SystemExit(f"README.md has no section '## {title}'")
    return found.group(1)


def commands(title: str, readme: Path = README) -> list[str]:
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", section(readme.read_text(), title), re.S | re.M)
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    print("\n".join(commands(sys.argv[1])))
