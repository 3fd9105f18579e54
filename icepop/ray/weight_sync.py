"""Moving the trainer's new weights into every rollout engine after an update, without restarting vLLM.

"broadcast": trainer rank 0 streams them over the weight group (icepop.comm; gloo on CPU, NCCL on GPU),
bucket by bucket under ZeRO-3, to engines on any node. "file": rank 0 writes one safetensors file (on
/dev/shm) that every engine reads; simple, but only for engines on the trainer's node. Colocated
engines (cluster.placement=colocated) get them from the trainer rank in their own process: no process
group, no file, no bytes through a socket.
"""

from __future__ import annotations

from icepop.ray.workers import RolloutGroup, TrainerGroup, gather


class WeightSync:
    """Pushes the trainer's new weights into every engine (see the module docstring); `method` is
    rollout.weight_sync, overridden by "colocated" when the engines live in the trainer ranks."""

    def __init__(self, method: str, trainer: TrainerGroup, rollout: RolloutGroup, file_path: str) -> None:
        self.method = "colocated" if rollout.colocated else method
        self.trainer, self.rollout, self.file_path = trainer, rollout, file_path
        self.backend = ""  # the weight group's, as the engines report it ("gloo", "nccl"); broadcast only
        self.reconnect()

    def describe(self) -> str:
        """'weights by broadcast from trainer rank 0 to 2 engines over nccl' (one line, at start-up)."""
        engines = f"{len(self.rollout.actors)} engine(s)"
        if self.method == "colocated":
            return f"weights in-process from each trainer rank to its own engine ({engines})"
        if self.method == "broadcast":
            return f"weights by broadcast from trainer rank 0 to {engines} over {self.backend}"
        return f"weights by file ({self.file_path}) from trainer rank 0 to {engines}"

    def reconnect(self) -> None:
        """(Re)form the weight group of trainer rank 0 and every engine: at start, and after an engine
        was restarted (a new group on a new port; the old one is dropped by every member)."""
        import ray

        if self.method == "broadcast":  # trainer rank 0 is member 0 of the group, engine i is member i + 1
            addr, port = ray.get(self.trainer.actors[0].node_address.remote())
            size = 1 + len(self.rollout.actors)
            engines = [
                actor.call.remote("join_weight_group", addr, port, i + 1, size)
                for i, actor in enumerate(self.rollout.actors)
            ]
            sender = self.trainer.actors[0].call.remote("join_weight_group", addr, port, size)
            self.backend = "/".join(sorted(set(gather([sender, *engines])[1:])))

    def push(self, noise: tuple[float, int] | None = None) -> None:
        """Blocks until every engine holds the trainer's current weights (plus seeded noise of
        (level, seed) for a mismatch-injection stress test: icepop.rollout.noise)."""
        if self.method == "colocated":  # every rank into its own engine (ZeRO-3: gathering together)
            gather([actor.push_to_engine.remote(noise) for actor in self.trainer.actors])
        elif self.method == "broadcast":  # sender and receivers run together
            receive = self.rollout.async_call("receive_weights", noise)
            gather(self.trainer.async_call("broadcast_weights") + receive)
        else:  # the file must be complete before any engine reads it
            gather(self.trainer.async_call("export_weights", self.file_path))
            gather(self.rollout.async_call("load_weights", self.file_path, noise))
