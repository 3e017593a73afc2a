"""check_python: one line and exit 2 below the minimum, silent at it; the minimum matches the pinned packages."""
import ast
import importlib.metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from lft.common import MIN_PYTHON, check_python

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("version", [(3, 10, 14), (3, 9, 18, "final", 0), (2, 7, 18)])
def test_too_old_is_one_line_and_exit_2(version, capsys):
    with pytest.raises(SystemExit) as e:
        check_python(version)
    assert e.value.code == 2
    err = capsys.readouterr().err
    shown = ".".join(map(str, version[:3]))
    assert err == (f"error: Python {shown} is too old: LLM_Fine_Tuning needs Python >= 3.11 (its pinned "
                   "transformers, pandas and numpy do); run it with python3.11 or newer\n")


@pytest.mark.parametrize("version", [(3, 11, 0), (3, 12, 1), (4, 0, 0), None])
def test_new_enough_passes(version, capsys):
    check_python(version)
    assert capsys.readouterr() == ("", "")


def test_minimum_is_what_the_pinned_requirements_need():
    """MIN_PYTHON satisfies every pinned package's Requires-Python, and one minor version less does not."""
    pins = [line.split("==")[0] for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")]
    specs = {p: SpecifierSet(importlib.metadata.metadata(p).get("Requires-Python") or "") for p in pins}
    ok = "{}.{}.0".format(*MIN_PYTHON)
    below = "{}.{}.99".format(MIN_PYTHON[0], MIN_PYTHON[1] - 1)
    assert [p for p, s in specs.items() if ok not in s] == []
    assert [p for p, s in specs.items() if below not in s] != []


def test_common_parses_on_old_pythons():
    """So that an old interpreter reaches check_python instead of a SyntaxError."""
    ast.parse((REPO / "lft" / "common.py").read_text(encoding="utf-8"), feature_version=(3, 8))
    ast.parse((REPO / "lft" / "__init__.py").read_text(encoding="utf-8"), feature_version=(3, 8))
