"""Where rollouts come from: the inference engines and the cluster they run on. The defaults are a real
model's (a bfloat16 engine against a float32 trainer, 512 new tokens); the tiny models' presets set
their own."""

from __future__ import annotations

from dataclasses import dataclass

from icepop.config.checks import (
    ROLLOUT_DTYPES,
    cpu_flags,
    engine_dtype,
    non_negative,
    one_of,
    positive,
    zero_or_one_gpu,
)
from icepop.types import SamplingSettings

ROLLOUT_BACKENDS = ("vllm",)
"""The implementations of icepop.rollout.base.engine_class."""


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    """Inference engine implementation (icepop.rollout.base.engine_class)."""
    engines: int = 1
    """Number of vLLM engines (Ray actors); prompts are split across them, groups kept together."""
    temperature: float = 1.0
    """Sampling temperature; the trainer scores tokens under the same processed distribution."""
    top_p: float = 1.0
    """Nucleus sampling; keep 1.0 for RL unless the trainer applies the same truncation."""
    top_k: int = 0
    """Top-k sampling, 0 = off; keep 0 for RL for the same reason."""
    max_new_tokens: int = 512
    """Longest response; longer ones are truncated and counted (response_length/truncated_frac)."""
    max_model_len: int | None = None
    """The engine's context length; None: data.max_prompt_tokens + rollout.max_new_tokens. Checked
    against the model's max_position_embeddings."""
    dtype: str = "auto"
    """Engine weight dtype; "bfloat16" against a float32 trainer gives the real, small mismatch IcePop
    corrects, "float16" a smaller one (3 more mantissa bits), "float32" an exact one (to ~1e-6). "auto":
    bfloat16 where the engine has bfloat16 arithmetic (a GPU, or a CPU with AVX512-BF16/AMX), float32
    otherwise (icepop.config.checks.engine_dtype; the plan says which and why)."""
    quantization: str | None = None
    """"fp8": the engines' linear layers hold FP8 E4M3 weights, one scale per tensor, re-quantized from the
    trainer's at every sync (icepop.rollout.fp8); needs a 16-bit rollout.dtype, the engine's otherwise.
    On GPUs vLLM's own online FP8; on CPU engines "FP8 weight rounding, simulated": the weights are
    rounded exactly so and served by the 16-bit engine (weight-only; a Hopper GPU quantizes activations
    too). None: weights in rollout.dtype."""
    enforce_eager: bool = True
    """Run the engine's model eagerly; false lets vLLM capture CUDA graphs (GPU only, faster decoding)."""
    kv_cache_gib: float | None = None
    """KV-cache size per engine on CPU (vLLM's default asks for most of the RAM). None: what the run
    holds at once, an engine's share of a step's samples (or of the held-out prompts) each at the
    longest prompt of the data plus the reply or episode budget (icepop.rollout.kv_cache)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of a GPU's memory an engine may take (GPU only)."""
    cpus_per_engine: int = 1
    """CPUs reserved per engine in the placement group."""
    gpus_per_engine: int = 0
    """GPUs per engine: 0 on CPU machines, 1 on GPUs (tensor parallelism, more than 1, is not supported:
    the weight sync reaches only an engine that runs in its actor's process)."""
    weight_sync: str = "broadcast"
    """"broadcast" (rank 0 → engines over a gloo/NCCL group, multi-node) or "file" (/dev/shm, one node)."""
    mismatch_noise: float = 0.0
    """Stress test: noise of this × each tensor's std added to the engine's weights after every sync."""
    max_restarts: int = 3
    """Engines that die are restarted, re-synced and the step retried, at most this many times a run."""
    max_staleness: int = 0
    """Stale rollouts: batches generated while the trainer trains, at most this many weight versions
    behind it. 0 is the serial loop (generate, then train); N >= 1 generates the batch of step t + N, at
    the weights of step t - 1, while step t trains (docs/algorithm.md, "Stale rollouts"). Disaggregated
    placement only."""
    environment: str | None = None
    """Multi-turn episodes with tools: a built-in environment ("python_tool", "code_repair") or a dotted
    path to a callable that makes one ("my_pkg.envs:Make"; icepop.envs.base); its reward replaces
    reward.*. None: one reply per prompt."""
    max_turns: int = 3
    """Model turns per episode (rollout.environment, rollout.agent); rollout.max_new_tokens bounds each."""
    max_episode_tokens: int | None = None
    """Model and observation tokens per episode after the prompt (environment or agent); None:
    2 × max_turns × max_new_tokens."""
    environment_timeout_seconds: float = 30.0
    """Longest an environment's step may take; past it (or when it raises) the episode ends with reward 0."""
    agent: str | None = None
    """An unmodified agent as the episodes: a dotted path to `agent(row, client)` (sync, or async with an
    AsyncOpenAI client) that talks to the engine through an OpenAI-compatible endpoint served on
    127.0.0.1 (icepop.rollout.agents) and returns the episode's reward, or None for the row's verifier to
    score its last reply. rollout.max_turns and rollout.max_episode_tokens bound its episodes as they do
    an environment's. None: no agent."""
    agent_timeout_seconds: float = 120.0
    """Longest an agent's episode may take; past it (or when the agent raises) it ends with reward 0."""
    agent_tool_parser: str | None = None
    """With rollout.agent: vLLM's tool parser for the model's format ("hermes" for Qwen2.5/Qwen3 and
    Hermes models, "llama3_json", "mistral", ...), so that a reply to a request with `tools` comes back
    with `message.tool_calls`. None: replies are text only."""
    probe_tolerance: float | None = None
    """Sync probe limit on |Δ log p|: its max when engine and trainer are both float32 (None: 1e-3), else
    its mean over the probe tokens (None: by the least precise side, icepop.weights.TOLERANCE: float16
    0.03, bfloat16 0.1, fp8 0.2), since single 16-bit tokens jump with MoE routing flips."""

    def __post_init__(self) -> None:
        one_of("rollout.backend", self.backend, ROLLOUT_BACKENDS)
        if self.dtype == "auto":  # decided here, by the hardware the run starts on
            self.dtype, _ = engine_dtype(self.gpus_per_engine, cpu_flags())
        one_of("rollout.dtype", self.dtype, ROLLOUT_DTYPES)
        one_of("rollout.quantization", self.quantization, (None, "fp8"))
        if self.quantization is not None and self.dtype == "float32":
            raise ValueError(
                f"rollout.quantization={self.quantization} needs a 16-bit engine: vLLM's FP8 layers take "
                "bfloat16 or float16 activations; set rollout.dtype=bfloat16 (or float16)"
            )
        one_of("rollout.weight_sync", self.weight_sync, ("broadcast", "file"))
        positive(
            **{
                "rollout.engines": self.engines,
                "rollout.temperature": self.temperature,
                "rollout.max_new_tokens": self.max_new_tokens,
            }
        )
        if self.kv_cache_gib is not None:
            positive(**{"rollout.kv_cache_gib": self.kv_cache_gib})
        non_negative(**{"rollout.top_k": self.top_k, "rollout.mismatch_noise": self.mismatch_noise,
                        "rollout.max_restarts": self.max_restarts,
                        "rollout.max_staleness": self.max_staleness})  # fmt: skip
        positive(**{"rollout.cpus_per_engine": self.cpus_per_engine, "rollout.max_turns": self.max_turns,
                    "rollout.environment_timeout_seconds": self.environment_timeout_seconds,
                    "rollout.agent_timeout_seconds": self.agent_timeout_seconds})  # fmt: skip
        self._check_episodes()
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1]; got {self.top_p}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                "rollout.gpu_memory_utilization is the fraction of a GPU's memory vLLM may take, in (0, 1]; "
                f"got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(
                f"rollout.max_model_len must be >= 2 (or null: prompt + response); got {self.max_model_len}"
            )
        if self.gpus_per_engine > 1:
            raise ValueError(
                f"rollout.gpus_per_engine={self.gpus_per_engine}: tensor parallelism is not supported (the "
                "weight sync reaches only an engine running in its actor's process); use 1 GPU per engine "
                "and more engines (rollout.engines)"
            )
        if not self.enforce_eager and self.gpus_per_engine == 0:
            raise ValueError(
                "rollout.enforce_eager=false needs GPUs (rollout.gpus_per_engine=1, e.g. cluster=gpu): "
                "vLLM's CPU backend runs eagerly"
            )
        zero_or_one_gpu("rollout.gpus_per_engine", self.gpus_per_engine, "GPU")
        if self.probe_tolerance is not None and not self.probe_tolerance > 0:
            raise ValueError(f"rollout.probe_tolerance must be > 0 (or null); got {self.probe_tolerance}")

    def _check_episodes(self) -> None:
        """One maker of episodes at most (an environment or an agent), and their limits."""
        if self.agent_tool_parser is not None and self.agent is None:
            raise ValueError(
                f"rollout.agent_tool_parser={self.agent_tool_parser!r} reads tool calls out of an agent's "
                "replies; set rollout.agent too (or leave the parser null)"
            )
        if self.environment is not None and self.agent is not None:
            raise ValueError(
                f"rollout.environment={self.environment!r} and rollout.agent={self.agent!r} both make the "
                "episodes; set one of them (the other null)"
            )
        if self.max_episode_tokens is not None and self.max_episode_tokens < 1:
            raise ValueError(
                f"rollout.max_episode_tokens must be >= 1 (or null); got {self.max_episode_tokens}"
            )

    def context_length(self, max_prompt_tokens: int) -> int:
        """The engine's context: max_model_len, or prompt + response budget."""
        return self.max_model_len or max_prompt_tokens + self.response_tokens()

    def sampling(self, seed: int | None) -> SamplingSettings:
        """How the engines sample the run's rollouts (`seed`: the batch's)."""
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )

    @property
    def episodic(self) -> bool:
        """Multi-turn episodes (rollout.environment or rollout.agent) instead of one reply per sample:
        each carries its own reward."""
        return self.environment is not None or self.agent is not None

    def response_tokens(self) -> int:
        """The most tokens after a prompt: one reply's, or with an environment or agent an episode's."""
        if not self.episodic:
            return self.max_new_tokens
        return self.max_episode_tokens or 2 * self.max_turns * self.max_new_tokens


PLACEMENTS = ("disaggregated", "colocated")


@dataclass
class ClusterConfig:
    address: str | None = None
    """Ray address to join ("auto" or "host:port"); None starts a local cluster on 127.0.0.1."""
    num_cpus: int | None = None
    """Logical CPUs of the local cluster; None: enough for every bundle plus one for the driver's tasks."""
    placement: str = "disaggregated"
    """"disaggregated": engines and trainer ranks on bundles of their own. "colocated": each trainer rank's
    process also hosts one engine (rollout.engines = trainer.ranks; it uses the rank's CPUs or GPU, so
    rollout.cpus_per_engine and rollout.weight_sync are not used: the weights move in-process); on GPUs
    the engines sleep while the ranks train (untested on GPUs)."""

    @property
    def colocated(self) -> bool:
        """Each trainer rank's process hosts one engine (cluster.placement=colocated)."""
        return self.placement == "colocated"

    def __post_init__(self) -> None:
        one_of("cluster.placement", self.placement, PLACEMENTS)
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"cluster.num_cpus must be >= 1 (or null); got {self.num_cpus}")


def check_placement(cluster: ClusterConfig, rollout: RolloutConfig, ranks: int, gpus_per_rank: int) -> None:
    """Colocated engines are one per trainer rank, on the rank's devices: refuse counts that disagree.
    Disaggregated, a broadcast needs both sides on one kind of device (a CPU rank's gloo group and a GPU
    engine's NCCL group would wait for each other until the timeout)."""
    if not cluster.colocated:
        if rollout.weight_sync == "broadcast" and (rollout.gpus_per_engine > 0) != (gpus_per_rank > 0):
            raise ValueError(
                "rollout.weight_sync=broadcast needs the engines and the trainer ranks on the same kind of "
                f"device; got rollout.gpus_per_engine={rollout.gpus_per_engine} and "
                f"trainer.gpus_per_rank={gpus_per_rank}: give both a GPU (cluster=gpu), or use "
                "rollout.weight_sync=file (engines on trainer rank 0's node)"
            )
        return
    if rollout.max_staleness:
        raise ValueError(
            f"rollout.max_staleness={rollout.max_staleness} generates while the trainer trains, but "
            "cluster.placement=colocated runs each engine inside a trainer rank's process, one after the "
            "other: use cluster.placement=disaggregated, or rollout.max_staleness=0"
        )
    if rollout.engines != ranks:
        raise ValueError(
            f"cluster.placement=colocated hosts one engine in each trainer rank: rollout.engines must equal "
            f"trainer.ranks ({ranks}); got rollout.engines={rollout.engines}"
        )
    if rollout.gpus_per_engine != gpus_per_rank:
        raise ValueError(
            "cluster.placement=colocated runs each engine on its trainer rank's devices: "
            f"rollout.gpus_per_engine must equal trainer.gpus_per_rank ({gpus_per_rank}); "
            f"got {rollout.gpus_per_engine}"
        )
