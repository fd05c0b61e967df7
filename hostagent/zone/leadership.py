"""What a zone replica does next in the election for the leader, from what it sees (pure).

The election is the standard etcd campaign: a replica holds a lease it keeps alive; it
creates the leader key bound to that lease if the key is absent; whoever created it leads
until the key goes (lease expired or revoked), which every replica sees through its watch.
The leader's writes compare the key's create revision (its fence), so a replica that lost
the lead without noticing (paused, partitioned) cannot write.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Step(enum.Enum):
    CAMPAIGN = "campaign"  # no leader: try to create the leader key
    LEAD = "lead"  # the leader key is ours, of the term we won
    FOLLOW = "follow"  # another replica leads
    STEP_DOWN = "step_down"  # we led, but our leader key is gone or another's
    RENEW = "renew"  # our lease may have expired: stop leading, start over with a new one


@dataclass(frozen=True)
class View:
    me: str
    leader: tuple[str, int] | None  # the leader key as the watch shows it: id, revision
    fence: int | None  # the revision of the leader key we created, while we believe we lead
    lease_left_s: float  # how long our lease surely lives (from the last renewal sent)


def decide(view: View) -> Step:
    if view.lease_left_s <= 0:
        return Step.RENEW
    if view.fence is not None:
        return Step.LEAD if view.leader == (view.me, view.fence) else Step.STEP_DOWN
    if view.leader is None:
        return Step.CAMPAIGN
    return Step.FOLLOW


def lease_left(sent_at: float, granted_ttl_s: float, now: float) -> float:
    """Seconds a lease surely has left: etcd counts its TTL from when it handled the renewal,
    which is no earlier than when we sent it."""
    return sent_at + granted_ttl_s - now
