"""Where the rollout engines live, as a strategy chosen once: `Disaggregated` (actors of their own on
rollout bundles; the weights come by broadcast or by file) or `Colocated` (one engine inside each
trainer rank's process; the weights are handed over in-process, the engine sleeping while its rank
trains). `engine_placement` is the only place that reads cluster.placement.

Both answer the same questions — do the engines need bundles, which devices does an engine use, what
must the trainer ranks' DeepSpeed config hold for them, how are they started and called, how do new
weights reach them, how do they sleep, which died and how is one restarted — so
`icepop.ray.engines.Engines`, the bundles and the start-up never ask which one they have. A new
placement is a third class with these methods and a branch in `engine_placement`.
"""

from __future__ import annotations

from typing import Any

from icepop.config import Config
from icepop.ray.actors import dead_actors, gather, make_actor, make_actors
from icepop.ray.hosts import EngineHost
from icepop.rollout.base import engine_class
from icepop.rollout.kv_cache import run_kv_cache_bytes
from icepop.rollout.noise import Noise


def engine_settings(
    config: Config, model_path: str, with_trainer: bool = True, prompt_tokens: int | None = None
) -> dict[str, Any]:
    """The keyword arguments every rollout engine of the run is built with (icepop.rollout.base): on the
    devices its placement gives it (`devices`), sleeping between steps where that frees a GPU; a KV
    cache for prompts of up to `prompt_tokens` (the data's longest; else data.max_prompt_tokens)."""
    rollout = config.rollout
    placement = engine_placement(config, with_trainer)
    cpus, gpus = placement.devices(config)
    return {
        "model_path": model_path,
        "dtype": rollout.dtype,
        "quantization": rollout.quantization,
        "seed": config.run.seed,
        "max_model_len": rollout.context_length(config.data.max_prompt_tokens),
        "enforce_eager": rollout.enforce_eager,
        "kv_cache_bytes": kv_cache_bytes(config, model_path, prompt_tokens),
        "gpu_memory_utilization": rollout.gpu_memory_utilization,
        "enable_sleep_mode": placement.sleeps and gpus > 0,
        # On CPU vLLM's worker pins its own thread count; more threads than the bundle's cores stall it.
        "cpu_threads": cpus if gpus == 0 else None,
    }


def kv_cache_bytes(config: Config, model_path: str, prompt_tokens: int | None = None) -> int:
    """rollout.kv_cache_gib, or where it is None what an engine holds at once: its share of a step's
    samples or of the held-out prompts, each at the longest prompt plus the response budget."""
    rollout = config.rollout
    if rollout.kv_cache_gib is not None:
        return int(rollout.kv_cache_gib * 2**30)
    max_model_len = rollout.context_length(config.data.max_prompt_tokens)
    prompt = config.data.max_prompt_tokens if prompt_tokens is None else prompt_tokens
    context = min(max_model_len, prompt + rollout.response_tokens())
    sequences = -(-max(config.derived().samples_per_step, config.data.eval_size) // rollout.engines)
    return run_kv_cache_bytes(model_path, rollout.dtype, sequences, context, max_model_len)


class Disaggregated:
    """Engines on rollout bundles of their own, one `EngineHost` actor each. New weights come from trainer
    rank 0 by broadcast over a weight group of its own (rollout.weight_sync=broadcast, any node) or
    through one safetensors file (=file, trainer rank 0's node); a dead engine is restarted on its
    bundle."""

    own_bundles = True
    """The rollout role reserves bundles (icepop.ray.bundles.roles)."""
    sleeps = False
    """The engines keep their devices between steps: no trainer rank shares them."""

    @staticmethod
    def devices(config: Config) -> tuple[int, int]:
        """(CPUs, GPUs) of one engine: its own bundle's."""
        return config.rollout.cpus_per_engine, config.rollout.gpus_per_engine

    @staticmethod
    def deepspeed_overrides(config: Config) -> dict[str, Any]:
        """What the trainer ranks' DeepSpeed config must hold for these engines: nothing, none shares a
        rank's process."""
        return {}

    def __init__(
        self,
        config: Config,
        model_path: str,
        bundles: Any,
        trainer: Any,
        weights_file: str,
        prompt_tokens: int | None,
    ) -> None:
        rollout = config.rollout
        self.method, self.trainer, self.weights_file = rollout.weight_sync, trainer, weights_file
        self._resources = (bundles.rollout, rollout.cpus_per_engine, rollout.gpus_per_engine)
        self._engine = (
            engine_class(rollout.backend),
            engine_settings(config, model_path, trainer is not None, prompt_tokens),
        )
        self.actors = make_actors(EngineHost, rollout.engines, *self._resources, "rollout")
        self.pending = [actor.setup.remote(*self._engine) for actor in self.actors]
        self.backend = ""
        """The weight group's, as the engines report it ("gloo", "nccl"); broadcast only."""

    def call(self, actor: Any) -> Any:
        """The actor method that forwards a call to its engine."""
        return actor.call

    def connect(self) -> None:
        """(Re)form the weight group of trainer rank 0 and every engine (broadcast): at start, and after an
        engine was restarted (a new group on a new port; the old one is dropped by every member)."""
        if self.trainer is None or self.method != "broadcast":
            return
        import ray

        addr, port = ray.get(self.trainer.actors[0].node_address.remote())
        size = 1 + len(self.actors)  # trainer rank 0 is member 0 of the group, engine i is member i + 1
        engines = [
            actor.call.remote("join_weight_group", addr, port, i + 1, size)
            for i, actor in enumerate(self.actors)
        ]
        sender = self.trainer.actors[0].call.remote("join_weight_group", addr, port, size)
        self.backend = "/".join(sorted(set(gather([sender, *engines])[1:])))

    def describe(self) -> str:
        """'weights by broadcast from trainer rank 0 to 2 engine(s) over gloo' (one line, at start-up)."""
        engines = f"{len(self.actors)} engine(s)"
        if self.method == "broadcast":
            return f"weights by broadcast from trainer rank 0 to {engines} over {self.backend}"
        return f"weights by file ({self.weights_file}) from trainer rank 0 to {engines}"

    def push(self, noise: Noise | None) -> None:
        """Block until every engine holds the trainer's current weights (plus `noise`)."""
        if self.method == "broadcast":  # sender and receivers run together
            receive = [actor.call.remote("receive_weights", noise) for actor in self.actors]
            gather(self.trainer.async_call("broadcast_weights") + receive)
        else:  # the file must be complete before any engine reads it
            gather(self.trainer.async_call("export_weights", self.weights_file))
            gather([actor.call.remote("load_weights", self.weights_file, noise) for actor in self.actors])

    def sleep(self) -> list[Any]:
        """Nothing to free: refs to wait for, none."""
        return []

    def dead(self) -> list[int]:
        """Indices of the engines whose actor has died (a live but busy one answers within 60 s)."""
        return dead_actors(self.actors)

    def restart(self, index: int, restarts: int) -> None:
        """Replace engine `index` (dead, or to be killed) by a new one on its bundle, with the starting
        weights: `connect` once every dead one is replaced, then push, before using it."""
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = make_actor(EngineHost, index, *self._resources, f"rollout-restart{restarts}")
        ray.get(self.actors[index].setup.remote(*self._engine))


class Colocated:
    """One engine inside each trainer rank's process (cluster.placement=colocated), built after the rank
    (vLLM then adopts the rank's process group) and reached through the rank's `call_engine`. Each rank
    hands its full weights to its own engine in-process: no weight group, no file, no bytes through a
    socket. On GPUs the engines sleep while the ranks train. An engine dies only with its rank, whose
    death ends the run: none is restarted."""

    own_bundles = False
    """The engines live in the trainer ranks' bundles."""
    sleeps = True
    """The engines free their devices for their ranks until the next push wakes them (vLLM sleep mode on
    GPUs; on CPU only marked asleep)."""

    @staticmethod
    def devices(config: Config) -> tuple[int, int]:
        """(CPUs, GPUs) of one engine: its trainer rank's."""
        return config.trainer.cpus_per_rank, config.trainer.gpus_per_rank

    @staticmethod
    def deepspeed_overrides(config: Config) -> dict[str, Any]:
        """Under ZeRO-3, memory_efficient_linear off: deepspeed.zero.Init otherwise replaces
        torch.nn.functional.linear for the whole process and never puts it back
        (`_enable_mem_efficient_linear`, deepspeed/runtime/zero/partition_parameters.py), and the engine
        built after it in the rank's process would run its linear layers through ZeRO-3's autograd
        function (vLLM calls torch.nn.functional.linear on GPUs, and keeps it as a layer's CPU kernel
        where nothing better fits)."""
        if config.trainer.zero_stage != 3:
            return {}
        return {"zero_optimization": {"memory_efficient_linear": False}}

    def __init__(
        self,
        config: Config,
        model_path: str,
        bundles: Any,
        trainer: Any,
        weights_file: str,
        prompt_tokens: int | None,
    ) -> None:
        self.trainer = trainer
        self.actors = list(trainer.actors)
        # Queued behind each rank's own set-up, which forms the process group vLLM joins.
        engine = (
            engine_class(config.rollout.backend),
            engine_settings(config, model_path, True, prompt_tokens),
        )
        self.pending = [actor.setup_engine.remote(*engine) for actor in self.actors]

    def call(self, actor: Any) -> Any:
        return actor.call_engine

    def connect(self) -> None:
        """Nothing to connect: each rank reaches its engine in its own process."""

    def describe(self) -> str:
        return f"weights in-process from each trainer rank to its own engine ({len(self.actors)} engine(s))"

    def push(self, noise: Noise | None) -> None:
        """Every rank into its own engine (waking it first); gathering together under ZeRO-3."""
        gather([actor.push_to_engine.remote(noise) for actor in self.actors])

    def sleep(self) -> list[Any]:
        return [actor.call_engine.remote("sleep") for actor in self.actors]

    def dead(self) -> list[int]:
        """None: an engine is only as dead as its rank, and a dead rank ends the run."""
        return []

    def restart(self, index: int, restarts: int) -> None:
        raise RuntimeError("a colocated engine is not restarted: it dies with its trainer rank")


EnginePlacement = Disaggregated | Colocated


def engine_placement(config: Config, with_trainer: bool = True) -> type[Disaggregated] | type[Colocated]:
    """The strategy cluster.placement names: the one place that reads it. Without trainer ranks (an
    evaluation) the engines have actors and bundles of their own whatever it says."""
    if config.cluster.placement == "disaggregated" or not with_trainer:
        return Disaggregated
    elif config.cluster.placement == "colocated":
        return Colocated
    raise ValueError(f"cluster.placement={config.cluster.placement!r} is not one of disaggregated, colocated")
