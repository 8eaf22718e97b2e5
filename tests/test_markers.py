"""Every file tests/conftest.py calls a system test exists (a renamed file would silently become a unit test and slow
`make test-fast`), and the markers reach the items."""

from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def test_system_files_exist():
    names = {p.name for p in TESTS.rglob("test_*.py")}
    assert [f for f in conftest.SYSTEM_FILES if f not in names] == []


def test_this_file_is_a_unit_test(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("system") is None
