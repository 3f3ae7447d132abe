"""``python -m benchmarks.sessions`` refuses counts it cannot report before starting anything."""

from __future__ import annotations

import pytest

from benchmarks import sessions


@pytest.mark.parametrize("utterances", ["0", "-3"])
def test_fewer_than_one_utterance_is_a_usage_error_before_the_stack_starts(
    utterances: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_stack(*args: object, **kwargs: object) -> None:
        raise AssertionError("the local stack was started")

    monkeypatch.setattr(sessions, "LocalStack", no_stack)
    monkeypatch.setattr(sessions, "isolate", lambda prefix: None)
    monkeypatch.setattr("sys.argv", ["sessions", "--utterances", utterances])
    with pytest.raises(SystemExit) as exited:
        sessions.main()
    assert exited.value.code == 2
    assert "--utterances: must be at least 1" in capsys.readouterr().err
