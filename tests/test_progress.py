"""Issue #18 defect 7: progress when stderr is not a TTY (CI logs, nohup, `make demo > log`)."""

import io
import re
import threading
import time

import pytest
from rich.console import Console

from diffpro_cli.console import UI
from diffpro_cli.metrics.latency import interleaved

LINE = re.compile(r"^(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\), elapsed \d+s, ETA (\d+s|\?)$")


def plain_ui(**kwargs) -> tuple[UI, io.StringIO]:
    """A non-interactive UI whose stderr console writes into a buffer."""
    ui = UI(interactive=False, **kwargs)
    buf = io.StringIO()
    ui.err = Console(file=buf, highlight=False, soft_wrap=True, force_terminal=False)
    return ui, buf


def lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln.strip()]


def test_plain_progress_prints_done_total_on_every_advance_when_interval_is_zero():
    ui, buf = plain_ui(progress_interval=0)
    with ui.progress("profiling", total=4) as advance:
        for _ in range(4):
            advance()
    got = lines(buf)
    assert len(got) == 4        # the end line is not repeated when the last advance already printed 4/4
    parsed = [LINE.match(ln) for ln in got]
    assert all(parsed), got
    assert [int(m["done"]) for m in parsed] == [1, 2, 3, 4]
    assert {m["desc"] for m in parsed} == {"profiling"} and {m["total"] for m in parsed} == {"4"}
    assert [m["pct"] for m in parsed] == ["25", "50", "75", "100"]


def test_plain_progress_is_throttled_to_one_end_line_within_the_interval():
    ui, buf = plain_ui(progress_interval=10_000)
    with ui.progress("students K=5", total=300) as advance:
        for _ in range(100):
            advance(3)
    got = lines(buf)
    assert len(got) == 1
    m = LINE.match(got[0])
    assert m and m["done"] == "300" and m["total"] == "300" and m["pct"] == "100"


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFPRO_PROGRESS_INTERVAL", "0")
    ui, buf = plain_ui()
    with ui.progress("x", total=3) as advance:
        for _ in range(3):
            advance()
    assert len(lines(buf)) == 3
    monkeypatch.setenv("DIFFPRO_PROGRESS_INTERVAL", "10000")
    ui, buf = plain_ui()
    with ui.progress("x", total=3) as advance:
        for _ in range(3):
            advance()
    assert len(lines(buf)) == 1


def test_plain_progress_without_total_counts_items():
    ui, buf = plain_ui(progress_interval=10_000)
    with ui.progress("features", total=None) as advance:
        advance(5)
    got = lines(buf)
    assert len(got) == 1 and got[0].startswith("features: 5 done, elapsed ")


def test_no_end_line_when_the_block_raises():
    ui, buf = plain_ui(progress_interval=10_000)
    with pytest.raises(KeyboardInterrupt):
        with ui.progress("x", total=3) as advance:
            advance()
            raise KeyboardInterrupt
    assert lines(buf) == []


def test_quiet_prints_no_progress_and_no_heartbeat():
    ui, buf = plain_ui(quiet=True, progress_interval=0)
    with ui.progress("x", total=3) as advance:
        for _ in range(3):
            advance()
    with ui.heartbeat("y"):
        time.sleep(0.05)
    assert buf.getvalue() == ""
    assert not any(t.name == "diffpro-heartbeat" for t in threading.enumerate())


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_heartbeat_prints_while_the_block_runs_and_stops_after():
    ui, buf = plain_ui(progress_interval=0.02)
    with ui.heartbeat("memory: measuring builtin:dit-mnist"):
        _wait_for(lambda: len(lines(buf)) >= 2)
        assert any(t.name == "diffpro-heartbeat" for t in threading.enumerate())
    assert not any(t.name == "diffpro-heartbeat" for t in threading.enumerate())
    assert all(re.fullmatch(r"memory: measuring builtin:dit-mnist: still working, elapsed \d+s", ln) for ln in lines(buf))


def test_interleaved_reports_each_round_of_repeats():
    calls = []
    interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=0, advance=calls.append)
    assert calls == [1, 1, 1]
    ui, buf = plain_ui(progress_interval=0)
    stats = interleaved({"a": lambda: None}, repeats=2, warmup=0, ui=ui, description="bench: timing")
    assert stats["a"]["repeats"] == 2
    assert [LINE.match(ln)["done"] for ln in lines(buf)] == ["1", "2"]


def test_tty_bar_and_spinner_nest_without_rich_live_errors():
    """rich allows one live display at a time: a heartbeat inside a bar (or the reverse) must not raise."""
    ui = UI(interactive=True)
    ui.err = Console(file=io.StringIO(), force_terminal=True)
    with ui.progress("outer", total=2) as advance:
        with ui.heartbeat("inner"):
            advance()
    with ui.heartbeat("outer"):
        with ui.progress("inner", total=1) as advance:
            advance()


def test_a_step_longer_than_the_interval_still_prints_a_line_every_interval():
    """Catches: lines printed only from advance(), so one slow round (a timing round of a large model, a
    cache candidate's sampling) left a log silent for minutes; the watchdog thread outliving its block."""
    ui, buf = plain_ui(progress_interval=0.2)
    with ui.progress("timing layers", total=2) as advance:
        time.sleep(0.9)            # one round, no advance: the log must still move
        advance()
    got = lines(buf)
    during = [ln for ln in got if LINE.match(ln) and LINE.match(ln)["done"] == "0"]
    assert len(during) >= 3, got   # ~0.2, 0.4, 0.6, 0.8 s
    assert LINE.match(got[-1])["done"] == "1"
    assert not any(t.name == "diffpro-progress" for t in threading.enumerate())
    n = len(lines(buf))
    time.sleep(0.5)
    assert len(lines(buf)) == n    # nothing after the block ended


def test_messages_print_user_text_as_given_not_as_markup_or_emoji(capsys):
    """Catches: rich reading a spec like mynet:factory: as an emoji code, or a fingerprint's [avx2,...] flag
    list as a markup tag (it vanished from the cost-table warning), in info, warn and results."""
    ui = UI(interactive=False)   # its own stderr console, as the commands build it
    ui.info("loading mynet:factory: [avx2,avx512_vnni] done")
    ui.warn("measured on AMD EPYC [avx2,avx512f]")
    ui.result({}, human="mynet:factory: [x]")
    got = capsys.readouterr()
    assert got.err.splitlines() == ["loading mynet:factory: [avx2,avx512_vnni] done", "warning: measured on AMD EPYC [avx2,avx512f]"]
    assert got.out.strip() == "mynet:factory: [x]"


def test_the_watchdog_counts_from_the_last_line_printed_before_its_block():
    """Catches: a block's first keep-alive line coming a whole interval after the block started, so quiet
    work before it plus the interval left the log silent longer than the interval (34 s in a demo log)."""
    ui, buf = plain_ui(progress_interval=0.6)
    ui.info("setup done")
    time.sleep(0.45)               # quiet work between the last line and the block
    t0 = time.monotonic()
    with ui.progress("sampling", total=1) as advance:
        while len(lines(buf)) < 2 and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        first = time.monotonic() - t0
        advance()
    assert first < 0.45, first     # ~0.6 s after "setup done", not 0.6 s after the block began
