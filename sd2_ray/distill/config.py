"""Config of ``sd2 distill``: the target regenerates the responses its drafter will learn from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sd2_ray.config import NODE_RESOURCES_DESCRIPTION, NodeResources, StageConfig, StoragePath


class DistillSettings(StageConfig):
    """How to distil (the `distill` section of a pipeline config); :class:`DistillConfig` adds
    the paths."""

    mode: Literal["generate", "rewrite", "on-policy"] = Field(
        "generate",
        description="generate: answer the prompt; rewrite: restate the reference answer "
        "in the model's own words (kept only if it passes the filters, else the reference is kept); "
        "on-policy: the drafter answers, the target scores its tokens (top-k log-probs)",
    )
    logprobs_top_k: int = Field(
        0,
        ge=0,
        description="store the target's top-k token ids and temperature-1 log-probs for every "
        "response token (columns topk_ids, topk_logprobs; 8k + 12 bytes per token); 0 = off",
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="target engine: transformers (CPU or GPU) or vllm (ray.data.llm)"
    )
    actors: int = Field(2, ge=1, description="engine replicas (Ray Data actor pool size / vLLM concurrency)")
    batch_size: int = Field(16, ge=1, description="rows per engine batch")
    max_new_tokens: int = Field(64, ge=1, description="maximum generated tokens per row")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling threshold")
    seed: int = Field(0, description="sampling seed (non-greedy runs)")
    shard_size: int = Field(256, ge=1, description="input rows per output shard (the unit of resumption)")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="rows whose rendered prompt is longer are skipped, with a count "
        "(default: the engine's context minus max_new_tokens; the engine's context is "
        "vllm_engine_kwargs.max_model_len when set, else the target's max_position_embeddings)",
    )
    allow_truncated: bool = Field(
        False, description="rewrite mode: keep a rewrite that hit max_new_tokens (else keep the reference)"
    )
    overwrite: bool = Field(False, description="redo a complete output instead of skipping it")
    min_usable_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="fail when fewer than this share of "
        "the prompt rows are usable (bad rows are skipped and listed in "
        "_skipped.jsonl; with no usable row the stage always fails)",
    )
    limit: int | None = Field(None, ge=1, description="only the first N input rows (smoke runs)")
    categories: list[str] | None = Field(
        None,
        min_length=1,
        description="only prompt rows of these task categories (the rows' 'category'); "
        "limit then takes the first N of them. The fine-tune sees only these tasks, eval sees all",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights/activations dtype of the engines"
    )
    node_resources: NodeResources = Field(default_factory=dict, description=NODE_RESOURCES_DESCRIPTION)
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved by each engine replica")
    gpus_per_actor: float = Field(
        0.0, ge=0.0, description="GPUs per replica (transformers) or per tensor-parallel worker (vllm); 0 = CPU"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per transformers actor (default: cpus_per_actor, at least 1)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs (or CPU workers) per replica")
    max_restarts: int = Field(4, ge=-1, description="restarts of a dead engine actor (-1 = unlimited)")
    trust_remote_code: bool = Field(False, description="allow custom model code from the model directory")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vllm: extra engine kwargs (e.g. max_model_len, enforce_eager)"
    )

    @model_validator(mode="after")
    def _check_combination(self) -> DistillSettings:
        if self.engine == "transformers" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 needs engine=vllm")
        if self.mode == "on-policy":
            if self.engine != "transformers":
                raise ValueError("on-policy needs engine transformers")
            if not self.logprobs_top_k:
                raise ValueError("on-policy needs logprobs_top_k > 0 (the target's scores are the data)")
        model_len = self.vllm_engine_kwargs.get("max_model_len")
        if model_len is not None and (not isinstance(model_len, int) or model_len <= self.max_new_tokens):
            raise ValueError(
                f"vllm_engine_kwargs.max_model_len ({model_len!r}) must be an integer above "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self

    def model_len(self, context: int | None) -> int:
        """The engine's context (prompt + response): vllm's max_model_len when configured, else
        ``context`` (the target's max_position_embeddings)."""
        configured = self.vllm_engine_kwargs.get("max_model_len") if self.engine == "vllm" else None
        if configured is not None:
            return int(configured)
        if context is None:
            raise ValueError(
                "the engine's context is unknown: set vllm_engine_kwargs.max_model_len "
                "or give the target's context length"
            )
        return int(context)

    def prompt_limit(self, context: int | None) -> int:
        """Longest prompt (tokens) sent to the engine: ``max_prompt_tokens``, else what the
        engine's context leaves after ``max_new_tokens``. A longer prompt is skipped up front
        (counted in the manifest), never sent to fail as a row."""
        if self.max_prompt_tokens:
            return self.max_prompt_tokens
        return max(1, self.model_len(context) - self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sampling_dict(self) -> dict[str, Any]:
        """The sampling settings recorded in the manifest (and part of each shard's fingerprint)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
        }


class DistillConfig(DistillSettings):
    """Self-data distillation: the target model answers (or rewrites the reference answer of) every
    prompt row, on a Ray Data actor pool of target engines; output is Parquet shards + manifest.json.

    Resumable: input rows are cut into shards of `shard_size` rows (in input order); a rerun skips
    shards already written and redoes the rest, so every input id appears exactly once.

    Modes: `generate` (the target answers), `rewrite` (the target restates the reference answer),
    `on-policy` (DistillSpec: `drafter` writes the continuations, the target scores every token of
    them; transformers engine, needs `logprobs_top_k`).

    Row contract (Parquet, one row per input id; a row repeating an earlier id is skipped):
    id, index, category (the input row's task category, or null), messages | prompt, response,
    reference, source (target | reference | drafter), finish_reason, prompt_tokens,
    response_tokens, rejected, error, and
      response_ids   list<int32>: the ids the response was decoded from, in the target's
                     tokenizer, ending with the EOS id when generation stopped on one (so it
                     is response_tokens or response_tokens + 1 long); null when source is
                     reference (the reference text was never generated) or on error.
    With `logprobs_top_k` = k > 0, two more columns, one inner list per response id:
      topk_ids       list<list<int32>>: the target's k most likely next ids at that position
      topk_logprobs  list<list<float32>>: their log-probabilities at temperature 1 (raw
                     logits' log-softmax, most likely first; see sd2_ray/distill/scoring.py)
    A vision-language (LLaVA) target also takes image rows (`image` or `images` beside the
    prompt; docs/configuration.md "Image rows"); its output adds two columns:
      image / images string / list<string>: the row's image reference(s), relative local paths
                     made absolute (both null on a text row)
    Size per response token, Arrow in memory: 4 (response id) + 8k (k ids + k values) + 8
    (two inner-list offsets) bytes = 172 B at k = 20 (vs ~4-5 B of text). On disk Parquet
    saves little (float log-probs hardly compress): 137 B per token more than without top-k at
    k = 20 on the kit (154 vs 16 B per token for the whole row; bench/bench_distill.py).
    """

    target: StoragePath = Field(..., description="target model: HF directory, local path or s3:// prefix")
    prompts: StoragePath = Field(..., description="prompt rows: JSONL/Parquet file or directory, local or s3://")
    output: StoragePath = Field(..., description="output directory for Parquet shards + manifest.json, local or s3://")
    drafter: StoragePath | None = Field(
        None,
        description="on-policy mode: the drafter that writes the continuations (HF dir, local or "
        "s3://; must share the target's tokenizer); sampled with temperature/top_p/seed",
    )

    @model_validator(mode="after")
    def _drafter_for_on_policy(self) -> DistillConfig:
        if self.mode == "on-policy" and not self.drafter:
            raise ValueError("on-policy needs a drafter (--drafter DIR)")
        if self.mode != "on-policy" and self.drafter:
            raise ValueError("drafter is only used by mode on-policy")
        return self
