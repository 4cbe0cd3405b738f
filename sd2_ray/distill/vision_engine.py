"""The transformers engine for a vision-language (LLaVA) target (pure: no Ray).

:class:`VisionTargetEngine` decodes with :class:`sd2_ray.vision.prefill.VisionSpecEngine`, target
only: the same batched, KV-cached loop eval and serve use, with each prompt's image features put
in place of its image tokens at prefill. Its greedy output is what the target says, so the
drafter learns the target's answers with the images it answered about.

:class:`VisionBatchUDF` is the Ray Data callable (placed by :mod:`sd2_ray.distill.ray_data`).
It reads each row's images itself, from the references the driver resolved (data URL, base64,
an absolute local path or an ``s3://`` URI), on the node it runs on: the pictures never travel
through the object store, and the driver never decodes them. A row whose image is missing,
unreadable or not an image comes back with ``skipped`` set to the reason (``image: ...``); the
driver counts it with the shard's skipped rows and writes no output row for it. Such a row never
reaches the model, so it cannot fail the batch of the others.

Sampling: each row has its own seed (``seed`` + the row's input position), so a rerun or a
different batching samples the same text.
"""

from __future__ import annotations

import logging
from typing import Any

from sd2_ray.distill.core import Generated
from sd2_ray.distill.engines import EngineOutput, generated_of, result_columns
from sd2_ray.distill.scoring import split_at_eos, with_stop_token

log = logging.getLogger(__name__)


class VisionTargetEngine:
    """A LLaVA target, its tokenizer and its image preprocessing, loaded once per actor."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu", torch_threads: int | None = None):
        import torch

        from sd2_ray.models.io import load_tokenizer, resolve_model_dir
        from sd2_ray.vision.images import image_processor
        from sd2_ray.vision.model import load_vlm
        from sd2_ray.vision.prefill import VisionSpecEngine

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # resolved here, on the actor's node (an s3:// target is downloaded into this node's cache)
        local = resolve_model_dir(model_dir)
        self.model = load_vlm(local, dtype=getattr(torch, dtype), device=device)
        self.tokenizer = load_tokenizer(local)
        self.engine = VisionSpecEngine(self.model, None, 0, target_tokenizer=self.tokenizer)
        self.eos_ids = list(self.engine.eos_token_ids)
        self.processor = image_processor(self.model.config)

    def pixels(self, refs: list[str]) -> tuple:
        """One (3, H, W) pixel tensor per reference; :class:`BadImage` naming what is wrong."""
        from sd2_ray.vision.images import BadImage, load_image, pixel_values

        if not refs:
            return ()
        images = [load_image(ref) for ref in refs]
        try:
            return tuple(pixel_values(images, self.processor))
        except Exception as err:  # noqa: BLE001 - an image the processor cannot take is a bad image
            raise BadImage(f"image: cannot be preprocessed ({type(err).__name__}: {err})") from None

    def generate(
        self,
        prompts: list[list[int]],
        images: list[tuple],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int],
    ) -> list[EngineOutput]:
        """One batched call; ``images[i]``: the pixel tensors of prompt i, in mark order."""
        from sd2_ray.specdec.types import GenerationRequest, SamplingParams

        requests = [
            GenerationRequest(
                prompt,
                max_new_tokens,
                SamplingParams(temperature, top_p, 0, seed if temperature > 0 else None),
                images=pixels,
            )
            for prompt, pixels, seed in zip(prompts, images, seeds, strict=True)
        ]
        outputs = []
        for result in self.engine.generate(requests, speculate=False):
            kept, reason = split_at_eos(result.token_ids, self.eos_ids, max_new_tokens)
            outputs.append(EngineOutput(kept, reason, with_stop_token(result.token_ids, kept)))
        return outputs

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class VisionBatchUDF:
    """Ray Data ``map_batches`` callable over request rows with an ``images`` column (a list of
    references per row, empty for a text row). A batch that raises is retried row by row."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        self.settings = settings
        self.engine = VisionTargetEngine(
            model_dir, dtype=settings["dtype"], device=settings["device"], torch_threads=settings.get("torch_threads")
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        indices = [int(i) for i in batch["index"]]
        prompts = [[int(t) for t in p] for p in batch["prompt_ids"]]
        refs = [[str(r) for r in row] for row in batch["images"]] if "images" in batch else [[] for _ in indices]
        results: dict[int, Generated] = {}
        ready: list[tuple[int, list[int], tuple]] = []  # (input index, prompt ids, pixel tensors)
        for index, prompt, row_refs in zip(indices, prompts, refs, strict=True):
            problem, pixels = self._read_images(row_refs)
            if problem:
                results[index] = Generated(index, None, None, 0, skipped=problem)
            else:
                ready.append((index, prompt, pixels))
        if ready:
            try:
                generated = self._generate(ready)
            except Exception as err:  # noqa: BLE001 - fall back to one row at a time
                log.warning("batch of %d rows failed (%s); retrying row by row", len(ready), err)
                generated = [self._generate_one(item) for item in ready]
            results.update((g.index, g) for g in generated)
        ordered = [results[i] for i in indices]
        out = result_columns(indices, batch["shard"], ordered, 0)
        out["skipped"] = [g.skipped for g in ordered]
        return out

    def _read_images(self, refs: list[str]) -> tuple[str | None, tuple]:
        from sd2_ray.vision.images import BadImage

        try:
            return None, self.engine.pixels(refs)
        except BadImage as err:
            return str(err).splitlines()[0], ()

    def _generate(self, items: list[tuple[int, list[int], tuple]]) -> list[Generated]:
        s = self.settings
        outputs = self.engine.generate(
            [prompt for _, prompt, _ in items],
            [pixels for _, _, pixels in items],
            s["max_new_tokens"],
            s["temperature"],
            s["top_p"],
            [s["seed"] + index for index, _, _ in items],
        )
        return [
            generated_of(index, self.engine.decode(o.kept), o) for (index, _, _), o in zip(items, outputs, strict=True)
        ]

    def _generate_one(self, item: tuple[int, list[int], tuple]) -> Generated:
        try:
            return self._generate([item])[0]
        except Exception as err:  # noqa: BLE001 - recorded on the row, the job goes on
            return Generated(item[0], None, None, 0, error=f"{type(err).__name__}: {err}")
