"""The transformers target engine (pure: no Ray), and the result rows both engines produce.

Request rows ``{index, shard, prompt_ids, prompt_text}`` map to result rows
``{index, shard, response, finish_reason, response_tokens, error}`` plus ``response_ids`` (EOS
included when generation stopped on it) and, with ``logprobs_top_k`` = k > 0, ``topk_ids`` /
``topk_logprobs`` (one k-list per response id; see :mod:`sd2_ray.distill.scoring` for which
distribution).

- :class:`TransformersEngine`: batched ``generate`` with KV cache, left padding.
- :class:`TransformersBatchUDF`: the callable class Ray Data runs on an actor pool (one model
  load per actor); it is plain Python, placed by :mod:`sd2_ray.distill.ray_data`.
- The vLLM engine's settings live in :mod:`sd2_ray.distill.vllm_engine`; on-policy mode's
  callable in :mod:`sd2_ray.distill.onpolicy`.

Nothing here imports Ray, vLLM or torch at module level.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sd2_ray.distill.core import Generated
from sd2_ray.distill.scoring import TopK, generation_topk, split_at_eos, with_stop_token

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("index", "shard", "response", "finish_reason", "response_tokens", "error")
TOKEN_COLUMNS = ("response_ids", "topk_ids", "topk_logprobs")


@dataclass
class EngineOutput:
    """One prompt's generation: ``kept`` (ids without the EOS, what the text decodes from),
    ``response_ids`` (with the EOS that ended it), the target's top-k per response id."""

    kept: list[int]
    reason: str
    response_ids: list[int]
    topk: TopK | None = None


class TransformersEngine:
    """Batched HF generation for token-id prompts. At temperature 0 each row's output equals an
    unbatched greedy ``model.generate`` on the same ids (left padding + attention mask)."""

    def __init__(
        self,
        model_dir: str,
        dtype: str = "float32",
        device: str = "cpu",
        torch_threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        import torch

        from sd2_ray.models.io import load_model, load_tokenizer, resolve_model_dir

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.torch = torch
        self.device = device
        # Resolved here, in the process that loads the weights: an s3:// model is downloaded
        # into this node's cache (shared safely by the actors of one node), never on the driver.
        local = resolve_model_dir(model_dir)
        self.model = load_model(local, dtype=getattr(torch, dtype), device=device, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(local, trust_remote_code=trust_remote_code)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[tuple[list[int], str]]:
        """(generated ids without the EOS, finish_reason) per prompt, in one batched call."""
        return [(o.kept, o.reason) for o in self.generate_scored(prompts, max_new_tokens, temperature, top_p, seed)]

    def generate_scored(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        top_k: int = 0,
    ) -> list[EngineOutput]:
        """One batched call; with ``top_k`` also the top-k of the raw logits of every step
        (``output_logits``: the logits before temperature / top-p, at temperature 1)."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if top_k:
            sampling.update(return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                use_cache=True,
                **sampling,
            )
        sequences = out.sequences if top_k else out
        generated = [seq[width:].tolist() for seq in sequences]
        outputs = []
        for gen in generated:
            kept, reason = split_at_eos(gen, self.eos_ids, max_new_tokens)
            outputs.append(EngineOutput(kept, reason, with_stop_token(gen, kept)))
        if top_k:
            scores = generation_topk(out.logits, [len(o.response_ids) for o in outputs], top_k)
            for o, topk in zip(outputs, scores, strict=True):
                o.topk = topk
        return outputs

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response (the shared convention, :mod:`sd2_ray.models.tokens`)."""
    from sd2_ray.models.tokens import eos_token_ids as shared

    return shared(model, tokenizer)


def transformers_settings(config) -> dict[str, Any]:
    """What each :class:`TransformersBatchUDF` needs of a distill config (plain, picklable)."""
    return {
        **config.sampling_dict(),
        "dtype": config.dtype,
        "device": "cuda" if config.gpus_per_actor > 0 else "cpu",
        "torch_threads": config.torch_threads or max(1, int(config.cpus_per_actor)),
        "trust_remote_code": config.trust_remote_code,
        "logprobs_top_k": config.logprobs_top_k,
    }


class TransformersBatchUDF:
    """Ray Data ``map_batches`` callable: loads the target once per actor, answers request batches.

    A batch that raises is retried row by row, so one bad row is recorded with its error and
    the others still get their responses.
    """

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        self.settings = settings
        self.engine = TransformersEngine(
            model_dir,
            dtype=settings["dtype"],
            device=settings["device"],
            torch_threads=settings.get("torch_threads"),
            trust_remote_code=settings.get("trust_remote_code", False),
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        indices = [int(i) for i in batch["index"]]
        prompts = [[int(t) for t in p] for p in batch["prompt_ids"]]
        try:
            generated = self._generate(prompts, indices)
        except Exception as err:  # noqa: BLE001 - fall back to one row at a time
            log.warning("batch of %d rows failed (%s); retrying row by row", len(prompts), err)
            generated = [self._generate_one(p, i) for p, i in zip(prompts, indices, strict=True)]
        return result_columns(indices, batch["shard"], generated, self.settings.get("logprobs_top_k", 0))

    def _generate(self, prompts: list[list[int]], indices: list[int]) -> list[Generated]:
        s = self.settings  # the seed follows the batch's first row, so a rerun samples the same
        outputs = self.engine.generate_scored(
            prompts,
            s["max_new_tokens"],
            s["temperature"],
            s["top_p"],
            seed=s["seed"] + min(indices),
            top_k=s.get("logprobs_top_k", 0),
        )
        return [generated_of(i, self.engine.decode(o.kept), o) for i, o in zip(indices, outputs, strict=True)]

    def _generate_one(self, prompt: list[int], index: int) -> Generated:
        try:
            return self._generate([prompt], [index])[0]
        except Exception as err:  # noqa: BLE001 - recorded on the row, the job goes on
            return Generated(index, None, None, 0, error=f"{type(err).__name__}: {err}")


def result_columns(indices: list[int], shards, generated: list[Generated], top_k: int) -> dict[str, list]:
    """A UDF's output batch: the result columns of its rows, in batch order."""
    out: dict[str, list] = {
        "index": indices,
        "shard": [int(s) for s in shards],
        "response": [g.text for g in generated],
        "finish_reason": [g.finish_reason for g in generated],
        "response_tokens": [g.response_tokens for g in generated],
        "error": [g.error for g in generated],
    }
    out.update(token_columns(generated, top_k))
    return out


def generated_of(index: int, text: str, output: EngineOutput) -> Generated:
    topk_ids, topk_lp = output.topk if output.topk is not None else (None, None)
    return Generated(
        index,
        text,
        output.reason,
        len(output.kept),
        token_ids=output.response_ids,
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
    )


def token_columns(generated: list[Generated], top_k: int) -> dict[str, list]:
    """The token-level result columns. Top-k cells are one Arrow list<value> array per row
    (empty for a failed row): Ray Data stacks a column of Arrow arrays into list<list<...>>
    without a Python object per value (nested Python lists cost ~6 % of generation time)."""
    out: dict[str, list] = {"response_ids": [g.token_ids for g in generated]}
    if top_k:
        out["topk_ids"] = [row_list_array(g.topk_ids, top_k, "int32") for g in generated]
        out["topk_logprobs"] = [row_list_array(g.topk_logprobs, top_k, "float32") for g in generated]
    return out


def row_list_array(matrix, k: int, dtype: str):
    """An (n, k) matrix (None: no rows) as an Arrow list<dtype> array of n lists of k values."""
    import numpy as np
    import pyarrow as pa

    values = np.zeros(0, dtype=dtype) if matrix is None else np.ascontiguousarray(matrix, dtype=dtype).ravel()
    offsets = np.arange(0, len(values) + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def to_generated(row: dict[str, Any], eos_ids: list[int], max_new_tokens: int, top_k: int = 0) -> Generated:
    """An engine output row (either engine; vLLM error rows skip the postprocess) as Generated."""
    if "response" not in row:  # a raw vLLM row: ray.data.llm sends failed rows past the postprocess
        from sd2_ray.distill.vllm_engine import vllm_result

        row = vllm_result(row, eos_ids, max_new_tokens, top_k)
    error = row.get("error")
    text = row.get("response")
    skipped = row.get("skipped")  # only a vision engine's rows have the column
    ids: Any = row.get("response_ids")  # a list, an array, None or NaN
    return Generated(
        index=int(row["index"]),
        text=None if _missing(text) else str(text),
        finish_reason=None if _missing(row.get("finish_reason")) else str(row["finish_reason"]),
        response_tokens=int(row.get("response_tokens") or 0),
        error=None if _missing(error) or error == "" else str(error),
        token_ids=None if _missing(ids) else [int(t) for t in ids],
        topk_ids=_matrix(row.get("topk_ids"), "int32", top_k),
        topk_logprobs=_matrix(row.get("topk_logprobs"), "float32", top_k),
        skipped=None if _missing(skipped) or skipped == "" else str(skipped),
    )


def _matrix(value: Any, dtype: str, k: int):
    """A nested list column's cell (pandas gives an array of arrays) as an (n, k) array."""
    import numpy as np

    if not k or _missing(value):
        return None
    if len(value) == 0:
        return np.zeros((0, k), dtype=dtype)
    if hasattr(value, "flatten"):  # an Arrow list array (a UDF's cell before Ray Data stacks it)
        return value.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, k)
    return np.stack([np.asarray(v, dtype=dtype) for v in value])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # pandas gives NaN for nulls
