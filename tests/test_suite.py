"""The test suite's own guards: what must not be skipped in CI."""

import pytest
from conftest import REFERENCE, require_fixture


def test_missing_reference_fixture_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    missing = tmp_path / "neobert-reference-tiny"
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI must provide"):
            require_fixture(missing)
    for value in ("", "false"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="not found"):
            require_fixture(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_fixture(missing)


def test_reference_fixture_is_where_the_parity_test_reads_it():
    """../shared/fixtures beside the checkout (DESIGN.md); CI has it, so this must not skip there."""
    assert REFERENCE.parts[-3:] == ("shared", "fixtures", "neobert-reference-tiny")
    assert require_fixture(REFERENCE) == REFERENCE
