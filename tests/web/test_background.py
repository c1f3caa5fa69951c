"""The tape report is computed in the background: one computation however many ask, the last
value while a newer one is computed, a page that says so (and reloads) while there is none."""

from __future__ import annotations

import datetime as dt
import threading
import time

from cax.web.background import BackgroundView
from tests.web.conftest import make_client


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now


def test_one_computation_at_a_time_and_the_last_value_meanwhile():
    release, calls = threading.Event(), []

    def compute() -> int:
        calls.append(1)
        assert release.wait(10)
        return len(calls)

    clock = Clock()
    view = BackgroundView("test", compute, max_age_s=60, wait_s=0.05, clock=clock)
    first = view.get()
    assert first.value is None and first.computing
    assert view.get().value is None and len(calls) == 1  # not started twice
    release.set()
    view.wait_s = 5
    done = view.get()
    assert done.value == 1 and done.taken == clock.now
    assert view.get().value == 1 and len(calls) == 1  # fresh: served as is
    clock.now += dt.timedelta(seconds=61)
    release.clear()
    view.wait_s = 0.05
    stale = view.get()  # too old: recomputed, the old value served meanwhile
    assert stale.value == 1 and stale.computing and len(calls) == 2
    release.set()
    view.wait_s = 5
    assert view.get().value == 2


def test_a_slow_computation_is_not_waited_for_nor_repeated_at_once():
    """A report that takes longer than the page may wait: the last value is served at once, and
    it is computed again only after twice as long as it took."""
    clock, calls = Clock(), []
    view = BackgroundView("slow", lambda: calls.append(1) or len(calls), max_age_s=60,
                          wait_s=5, clock=clock)
    assert view.get().value == 1
    view._took_s = 150.0  # as a report of 100,000 tape copies takes on the embedded store
    clock.now += dt.timedelta(seconds=299)
    assert view.get().value == 1 and len(calls) == 1  # not due: within twice its time
    clock.now += dt.timedelta(seconds=2)
    view._took_s = 150.0
    t0 = time.monotonic()
    assert view.get().value in (1, 2) and time.monotonic() - t0 < 1  # not waited for
    for _ in range(100):
        if len(calls) == 2:
            break
        time.sleep(0.05)
    assert len(calls) == 2


def test_a_failed_computation_is_reported_and_tried_again():
    outcomes = [RuntimeError("runs DB away"), 7]

    def compute() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    view = BackgroundView("test", compute, wait_s=5)
    failed = view.get()
    assert failed.value is None and failed.error == "runs DB away"
    assert view.get().value == 7


def test_the_tape_page_while_its_report_is_computed(world, monkeypatch):
    from cax.web import views

    release = threading.Event()
    real = views.tape_page
    monkeypatch.setattr(views, "tape_page", lambda db, config: release.wait(10) and
                        real(db, config))
    client = make_client(world)
    waiting = client.get("/tape")
    assert waiting.status_code == 503 and waiting.headers["Retry-After"]
    assert '<meta http-equiv="refresh"' in waiting.text and "being computed" in waiting.text
    assert client.get("/tape?format=json").status_code == 503
    assert client.get("/daemons").status_code == 200  # the other pages do not wait for it
    release.set()
    for _ in range(50):
        ready = client.get("/tape?format=json")
        if ready.status_code == 200:
            break
        threading.Event().wait(0.1)
    assert ready.status_code == 200 and set(ready.json) == {"months", "pending", "failed",
                                                            "as_of"}
    client.db.close()
