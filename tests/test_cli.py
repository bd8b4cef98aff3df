"""The shared command line: a user error is one line on stderr and exit status 2; `--verbose` (or
JCLIP_VERBOSE=1) puts its traceback first."""

from __future__ import annotations

import pytest

from jclip import cli


def raised(message: str) -> ValueError:
    try:
        raise ValueError(message)
    except ValueError as error:
        return error


@pytest.mark.parametrize("verbose", [False, True])
def test_a_user_error_is_one_line_and_status_2_and_verbose_adds_its_traceback(capsys, verbose):
    with pytest.raises(SystemExit) as stop:
        cli.user_error("jclip: invalid config: data.batch_size must be positive, got -3", raised("inner"),
                       verbose=verbose)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "jclip: invalid config: data.batch_size must be positive, got -3"
    if verbose:
        assert lines[0] == "Traceback (most recent call last):" and lines[-2] == "ValueError: inner"
    else:
        assert lines == lines[-1:]


def test_the_exit_status_is_the_callers(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.user_error("jclip: stopped: too many bad examples", code=3, verbose=True)  # no exception: no traceback
    assert stop.value.code == 3 and capsys.readouterr().err == "jclip: stopped: too many bad examples\n"


@pytest.mark.parametrize("argv, expected", [
    (["main"], False),
    (["main", "--verbose"], True),
    (["main", "--verbose", "--noverbose"], False),
    (["main", "--verbose=true"], True),
    (["main", "--verbose=0"], False),
    (["main", "--config.verbose=1"], False),
])
def test_verbose_is_read_from_a_command_line_that_did_not_parse(argv, expected):
    assert cli._verbose_in(argv) is expected


def test_a_quoted_message_loses_its_quotes_and_keeps_inner_ones(capsys, monkeypatch):
    def fail(argv):  # what ml_collections raises for an unknown key: a KeyError (whose str is a repr) inside
        raise AttributeError(KeyError("'learning_rat'\nDid you mean \"learning_rate\"?"))

    monkeypatch.setattr(cli.flags, "FLAGS", fail)
    with pytest.raises(SystemExit) as stop:
        cli.parse_flags(["main", "--config.optim.learning_rat=1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("jclip: invalid command line or config: 'learning_rat' Did you mean "
                                       "\"learning_rate\"?\n")
