"""Ray actors and waiting on them: an actor on its bundle, `gather` that fails fast and notices a stop
signal, and the signal state that `gather` raises from.

Below every other module of icepop.ray (it imports none of them), so the worker groups, the engine
placements and the cluster set-up can all use it.
"""

from __future__ import annotations

import signal
import time
from typing import Any

WAIT_SLICE_SECONDS = 0.5

STOP_SIGNAL: list[int] = []
"""The signal (SIGINT or SIGTERM) that asked the driver to stop (set by icepop.ray.cluster's handler).
`ray.wait` swallows the exception a signal handler raises while it blocks, so `gather` raises it
again, through `raise_if_stopping`, when it sees this."""


def raise_if_stopping() -> None:
    """Raise what the first stop signal asked for: KeyboardInterrupt for Ctrl-C, SystemExit(128 + 15)
    for SIGTERM; nothing when none came."""
    if STOP_SIGNAL:
        if STOP_SIGNAL[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + STOP_SIGNAL[0])


def gather(refs: list[Any]) -> list[Any]:
    """`ray.get` of several refs that raises as soon as one fails. A plain `ray.get` waits for all of
    them first, and the survivors of a dead trainer rank wait in a collective until its timeout."""
    import ray

    pending = list(refs)
    while pending:
        # In short waits, so that a Ctrl-C or SIGTERM is noticed within one of them. ray.wait swallows a
        # KeyboardInterrupt raised while it blocks and turns a SystemExit into SystemExit(1): raise what
        # the signal asked for instead.
        try:
            done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_SLICE_SECONDS)
        except SystemExit:
            raise_if_stopping()
            raise
        raise_if_stopping()
        ray.get(done)
    return ray.get(refs)


def wait_ready(*groups: Any) -> None:
    """Block until every actor of these groups (None entries are skipped) has finished its set-up."""
    gather([ref for group in groups if group is not None for ref in group.pending])


def make_actor(host: type, index: int, placement_group: Any, cpus: int, gpus: float, name: str) -> Any:
    """A `host` actor on bundle `index`, named "<name>-<index>-<placement group>"."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return (
        ray.remote(host)
        .options(
            num_cpus=cpus,
            num_gpus=gpus,
            name=f"{name}-{index}-{id(placement_group):x}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=index
            ),
        )
        .remote()
    )


def make_actors(host: type, count: int, placement_group: Any, cpus: int, gpus: float, name: str) -> list[Any]:
    """`count` `host` actors, actor i on bundle i."""
    return [make_actor(host, i, placement_group, cpus, gpus, name) for i in range(count)]


def dead_actors(actors: list[Any]) -> list[int]:
    """Indices of the actors that have died (a live but busy one answers within 60 s, or is taken as
    alive)."""
    import ray

    found = []
    for index, actor in enumerate(actors):
        try:
            call = actor.pid.remote()
        except Exception:  # Ray refuses the call itself: "Can't find actor ... It might be dead"
            found.append(index)
            continue
        try:
            ray.get(call, timeout=60)
        except ray.exceptions.RayActorError:
            found.append(index)
        except ray.exceptions.GetTimeoutError:
            pass
    return found


LOST_PEER = ("Connection reset by peer", "Connection closed by peer")
"""What gloo says in a survivor's collective when a member's process has gone."""


def dead_actor(actors: list[Any], error: Exception, wait_s: float = 30.0) -> int | None:
    """Which of `actors` died, as far as `error` tells: the one a RayActorError names, else the first
    found dead; None when all live. The error of a survivor can come first — a collective with a dead
    rank fails at once with gloo's "Connection reset by peer" while Ray has not yet marked the dead
    actor, which may even answer a call still — so after such an error they are asked again, once a
    second, for up to `wait_s` seconds before they are taken as all alive."""
    actor_id = getattr(error, "actor_id", None)
    ids = [a._actor_id.hex() for a in actors]
    if actor_id in ids:
        return ids.index(actor_id)
    deadline = time.monotonic() + (wait_s if any(text in str(error) for text in LOST_PEER) else 0.0)
    while not (dead := dead_actors(actors)) and time.monotonic() < deadline:
        time.sleep(1.0)
    return next(iter(dead), None)
