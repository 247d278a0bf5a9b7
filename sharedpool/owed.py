"""What the coordinator asked this process to give back, per resource, and
what is already on its way back (a part of :class:`~sharedpool.client.Client`).

What is owed is the process's, not a pool's: every pool of the process on a
resource answers the same reclaim, so the give-backs under way are counted
here too, by lease, and no two pools pay for one lease owed.
"""

from __future__ import annotations

import itertools
import threading
import time

from .lease import Lease

#: A slot given back for another pool of the process counts as on its way to
#: it for this long after its lease is released: the coordinator's grant
#: reaches that pool's acquire within a round trip (well under this), and a
#: checkin meanwhile must not pay again for the same acquire.
SIBLING_SETTLE = 0.01

#: Numbers the rounds of asking (a resource owed from nothing), unique for the
#: process: a client's state reset (a new session) must not repeat one.
_ROUNDS = itertools.count(1)


class Owed:
    """The owed-lease bookkeeping of a Client (a mixin: its state is made by
    :meth:`_init_owed`, from the client's own state reset)."""

    def _init_owed(self) -> None:
        self._owed: dict[str, int] = {}
        #: resource -> leases being given back (closing) for what is owed, by
        #: any pool of this process: what is owed is the process's, so is the
        #: count of what is already on its way (claimed by take_owed, settled
        #: by any release of the lease). Guarded, with _owed, by _owed_lock.
        self._giving: dict[str, set[int]] = {}
        #: taken last (under a pool's lock or _cond), nothing taken inside it
        self._owed_lock = threading.Lock()
        #: resource -> leases being given back for other pools of this process
        #: that wait (see take_for_siblings), settled as those above, then
        #: counted SIBLING_SETTLE longer (release times, oldest first)
        self._for_siblings: dict[str, set[int]] = {}
        self._sibling_settled: dict[str, list[float]] = {}
        #: resource -> fairness quantum the coordinator sent with its reclaim
        self._quanta: dict[str, float] = {}
        #: resource -> the round of asking it is owed in (see owed_round)
        self._owed_rounds: dict[str, int] = {}
        #: resources last asked for idle leases only (an infinite quantum)
        self._idle_only: set[str] = set()

    def owes(self, resource: str) -> int:
        """How many leases of ``resource`` the coordinator asked us to give back."""
        return self._owed.get(resource, 0)

    def owes_idle_only(self, resource: str) -> bool:
        """Whether what is owed of ``resource`` is idle leases only: none goes
        at its checkin (the asking process's own acquire waits for it)."""
        return resource in self._idle_only

    def owed_round(self, resource: str) -> int:
        """Which round of asking ``resource`` is owed in: a new one each time the
        coordinator asks for leases of it after it was owed none."""
        return self._owed_rounds.get(resource, 0)

    def _set_owed(self, resource: str, count: int) -> None:
        # Under _owed_lock.
        if count > 0 and not self._owed.get(resource):
            self._owed_rounds[resource] = next(_ROUNDS)
        self._owed[resource] = max(0, count)

    def take_owed(self, lease: Lease) -> bool:
        """Claim ``lease`` as one of those the coordinator asked back, its
        give-back about to start: False when as many are on their way already,
        from whichever pool of this process. Settled by any :meth:`release` of
        the lease (a give-back cut short and closed otherwise settles it too);
        asking again for a lease already claimed says True."""
        with self._owed_lock:
            return self._claim(self._giving, lease, self._owed.get(lease.resource, 0))

    def take_for_siblings(self, lease: Lease, waiting: int) -> bool:
        """Claim ``lease`` as a slot given back for one of ``waiting`` acquires
        of other pools of this process: False when as many slots are on their
        way to them already (checkins landing before the first give-back has
        served its waiter must not each pay). Settled as :meth:`take_owed`'s."""
        now = time.monotonic()
        with self._owed_lock:
            settled = self._sibling_settled.get(lease.resource)
            if settled:
                del settled[:sum(1 for t in settled if t <= now - SIBLING_SETTLE)]
            return self._claim(self._for_siblings, lease, waiting, len(settled) if settled else 0)

    @staticmethod
    def _claim(claims: dict[str, set[int]], lease: Lease, limit: int, also: int = 0) -> bool:
        # Under _owed_lock: claim ``lease`` in ``claims`` if fewer than ``limit``
        # are on their way (its resource's claims, and ``also`` more); again: True.
        giving = claims.get(lease.resource)
        if giving is not None and lease.id in giving:
            return True
        if limit <= (0 if giving is None else len(giving)) + also:
            return False
        claims.setdefault(lease.resource, set()).add(lease.id)
        return True

    def owed_left(self, resource: str) -> int:
        """Leases of ``resource`` owed and not yet on their way back."""
        return max(0, self._owed.get(resource, 0) - len(self._giving.get(resource, ())))

    def _forget_giving(self, lease: Lease) -> None:
        """``lease`` was revoked: no release will settle its give-back."""
        with self._owed_lock:
            self._settle_giving(lease)

    def _settle_giving(self, lease: Lease) -> None:
        # Under _owed_lock.
        for claims in (self._giving, self._for_siblings):
            giving = claims.get(lease.resource)
            if giving is not None and lease.id in giving:
                giving.remove(lease.id)
                if not giving:
                    del claims[lease.resource]
                if claims is self._for_siblings:
                    self._sibling_settled.setdefault(lease.resource, []).append(time.monotonic())

    def quantum(self, resource: str) -> float | None:
        """The fairness quantum the coordinator last asked for with a reclaim of
        ``resource`` (None: it has not said; the pool decides)."""
        quantum = self._quanta.get(resource)
        if quantum == 0 and not self._owed.get(resource):
            # 0 comes with the excess over a shrunk cap (due at once): all given
            # back, it must not make sibling pools pass a slot at every checkin.
            return None
        return quantum
