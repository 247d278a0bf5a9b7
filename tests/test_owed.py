"""What a process owes the coordinator (sharedpool.owed), without processes:
the counts a reclaim sets, the claims give-backs make, and the rounds of asking."""

from __future__ import annotations

from sharedpool.lease import Lease
from sharedpool.owed import Owed


class Book(Owed):
    def __init__(self) -> None:
        self._init_owed()


def asked(book: Book, resource: str, count: int) -> None:
    with book._owed_lock:  # as receiving.py sets it
        book._set_owed(resource, count)


def test_a_round_of_asking_starts_only_when_nothing_was_owed() -> None:
    """A count that moves (a quantum re-sent, a share recomputed) is the same
    round: a new one would reset every pool's armed look (giveback._give_idle)."""
    book = Book()
    assert book.owed_round("pg") == 0
    asked(book, "pg", 2)
    first = book.owed_round("pg")
    assert first > 0
    asked(book, "pg", 1)
    asked(book, "pg", 3)
    assert book.owed_round("pg") == first
    asked(book, "pg", 0)
    assert book.owed_round("pg") == first
    asked(book, "pg", 1)
    assert book.owed_round("pg") > first


def test_a_negative_count_owes_nothing() -> None:
    book = Book()
    asked(book, "pg", -3)
    assert (book.owes("pg"), book.owed_left("pg")) == (0, 0)


def test_claims_stop_at_what_is_owed_and_a_claim_repeated_stands() -> None:
    book = Book()
    a, b = Lease(1, "pg", 1), Lease(2, "pg", 2)
    assert not book.take_owed(a)  # nothing owed
    asked(book, "pg", 1)
    assert book.take_owed(a)
    assert book.take_owed(a)  # asked again for the same lease: still its give-back
    assert not book.take_owed(b)
    assert book.owed_left("pg") == 0


def test_owed_left_is_never_below_zero_when_the_count_drops_under_the_claims() -> None:
    """The coordinator lowered the count (a waiter left) after two give-backs
    started: nothing more is owed, not minus two (a pool's look would re-arm)."""
    book = Book()
    asked(book, "pg", 2)
    assert book.take_owed(Lease(1, "pg", 1)) and book.take_owed(Lease(2, "pg", 2))
    asked(book, "pg", 0)
    assert book.owed_left("pg") == 0
