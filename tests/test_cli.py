"""The shared entry-point behaviour: bad input is one ``error:`` line and exit status 1, anything else
keeps its traceback."""

import logging

import pytest

from repae.cli import exit_on_bad_input


def test_bad_input_ends_the_process_with_one_error_line_and_status_1():
    with pytest.raises(SystemExit) as exit_info, exit_on_bad_input():
        raise FileNotFoundError("data/images.h5 does not exist")
    assert exit_info.value.code == "error: data/images.h5 does not exist"  # printed to stderr, status 1
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__


def test_an_error_that_is_not_bad_input_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"), exit_on_bad_input():
        raise RuntimeError("a bug")
    with pytest.raises(ValueError, match="not ours"), exit_on_bad_input(message=lambda error: None):
        raise ValueError("not ours")


def test_the_error_line_is_also_logged_where_a_logger_is_given(caplog):
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(SystemExit, match="^error: 100% wrong$"),
        exit_on_bad_input(message=lambda error: f"{error} wrong", log=logging.getLogger("repae.test")),
    ):
        raise ValueError("100%")
    assert [record.getMessage() for record in caplog.records] == ["100% wrong"]
