"""The command line as a newcomer meets it: --help without importing torch (so it is instant),
every flag explained with its default, no flag twice, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bpfree.cli import COMMANDS, build_parser, version

JOBS = [name for name in COMMANDS if name != "bench"]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_imports_neither_torch_nor_the_job(name: str) -> None:
    probe = (f"import sys\nfrom bpfree.cli import main\ntry:\n    main([{name!r}, '--help'])\n"
             "except SystemExit as e:\n    assert e.code == 0\n"
             "heavy = sorted(m for m in ('torch', 'flwr', 'grpc', 'ray', 'numpy') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: bpfree " + name in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.parametrize("name", JOBS)
def test_every_flag_has_help_and_none_is_offered_twice(name: str) -> None:
    parser = _subparser(name)
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_defaults_are_shown_as_the_user_meets_them() -> None:
    train = " ".join(_subparser("train").format_help().split())   # unwrapped
    assert "(default: 4; 2 with --config)" in train          # --epochs: the recipe's, then the field's
    assert "(default: 1000,1000; 500,500 with --config)" in train
    simulate = _subparser("simulate")
    flags = {s for a in simulate._actions for s in a.option_strings}
    assert "--epochs" not in flags and "--local-epochs" in flags   # rounds x local epochs, not epochs
    assert "(default: 4; 3 with --config)" in " ".join(simulate.format_help().split())   # --rounds


def test_version(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as stop:
        build_parser(["--version"]).parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"bpfree {version()}" and version()[0].isdigit()
