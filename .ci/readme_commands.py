"""Print the shell commands of one README section's code blocks, one per line, as printed there;
with --in FILE, check instead that FILE runs each of them as a line of its own.

    python3 .ci/readme_commands.py "Install and test"
    python3 .ci/readme_commands.py --in .ci/run "Install and test"   # .ci/run's first step

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


def missing_from(script: Path, title: str) -> list[str]:
    """The section's commands that `script` does not run as a line of its own (comments aside)."""
    lines = {line.split("  #")[0].strip() for line in script.read_text().splitlines()}
    return [c for c in commands(title) if c.strip() not in lines]


if __name__ == "__main__":
    if sys.argv[1] == "--in":
        missing = missing_from(Path(sys.argv[2]), sys.argv[3])
        if missing:
            raise SystemExit(f"{sys.argv[2]} does not run README's {missing}; make them the same")
    else:
        print("\n".join(commands(sys.argv[1])))
