"""The one progress-bar rule: drawn on a terminal only, and never with --no-progress-bar."""

import io

from monta.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_on_a_terminal():
    out = _Terminal()
    assert list(progress_bar(range(3), file=out, desc="work", mininterval=0)) == [0, 1, 2]
    assert "work" in out.getvalue() and "3/3" in out.getvalue()


def test_silent_off_a_terminal_and_with_the_flag():
    for out, enabled in ((io.StringIO(), True), (_Terminal(), False)):
        assert list(progress_bar(range(3), file=out, enabled=enabled)) == [0, 1, 2]
        assert out.getvalue() == ""
