"""Lossless speculative decoding with images: the engine's loop, unchanged, over the LM half of a
LLaVA target and drafter, with the image features put in place of the ``<image>`` tokens when a
batch's prompts are prefilled.

How: each side's LM is a plain causal LM sharing the LLaVA checkpoint's weights
(:func:`text_lm`), and its token embedding takes a queue of image features
(:class:`ImageQueue`): an ``<image>`` id in a chunk takes the next feature vector, in row-major
order, exactly as LLaVA's own merge (``masked_scatter``) fills them. The queue is loaded once per
batch, right before its prefill, from features computed once per image: the vision tower runs
once and its output feeds the target's projector and, when the drafter carries the same tower
(a MASSV drafter does), the drafter's projector too. A drafter without images (a text-only
drafter) keeps an empty queue: its ``<image>`` ids read as that token's own embedding.
After the prefill, decoding never sees an image again, so the steady loop (and its compiled
steps) is the text engine's.
"""

from __future__ import annotations

import torch

from sd2_ray.specdec.engine import SpeculativeEngine


class ImageQueue:
    """A forward hook on an embedding: ``<image>`` positions take queued features in order."""

    def __init__(self, embedding: torch.nn.Module, image_token: int):
        self.embedding, self.image_token = embedding, image_token
        self.features: torch.Tensor | None = None
        self.used = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def load(self, features: torch.Tensor | None) -> None:
        """Queue (N, hidden) features for the next chunks; None or empty: nothing queued."""
        self.features = features if features is not None and len(features) else None
        self.used = 0
        if self.features is not None and self._handle is None:
            self._handle = self.embedding.register_forward_hook(self._fill)
        elif self.features is None and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _fill(self, module, args, output):
        ids = args[0]
        where = ids == self.image_token
        count = int(where.sum())
        if not count or self.features is None:
            return output
        taken = self.features[self.used : self.used + count]
        if len(taken) < count:
            raise ValueError(f"prompt has {count} image positions left but {len(taken)} image features")
        self.used += count
        if self.used == len(self.features):  # all consumed: the steady loop runs hook-free
            self.load(None)
        output = output.clone()
        output[where] = taken.to(output.dtype)
        return output


def text_lm(vlm):
    """The LLaVA model's LM as a plain ``*ForCausalLM`` sharing its modules (no copy), so the
    text engine's caches and steps run it unchanged."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(vlm.config.text_config)
    lm.model = vlm.model.language_model
    lm.lm_head = vlm.lm_head
    lm.generation_config = vlm.generation_config
    return lm.eval()


def image_features(vlm, pixel_values: torch.Tensor, tower_output: torch.Tensor | None = None) -> torch.Tensor:
    """(images × patches, hidden) projected features; ``tower_output`` reuses a vision tower's
    (selected) output computed for another model with the same tower."""
    selected = tower_output if tower_output is not None else tower_features(vlm, pixel_values)
    return vlm.model.multi_modal_projector(selected).flatten(0, 1)


def tower_features(vlm, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's output as LLaVA selects it (layer, CLS dropped): (images, patches, width)."""
    config = vlm.config
    device = next(vlm.model.vision_tower.parameters()).device
    out = vlm.model.vision_tower(pixel_values.to(device, vlm.dtype), output_hidden_states=True)
    selected = out.hidden_states[config.vision_feature_layer]
    return selected[:, 1:] if config.vision_feature_select_strategy == "default" else selected


def same_tower(a, b) -> bool:
    """Whether two LLaVA models carry the same vision tower (same config and weights)."""
    if a.config.vision_config.to_dict() != b.config.vision_config.to_dict():
        return False
    sa, sb = a.model.vision_tower.state_dict(), b.model.vision_tower.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


class VisionSpecEngine(SpeculativeEngine):
    """:class:`SpeculativeEngine` for a LLaVA target and a LLaVA (MASSV) or text-only drafter.

    Requests carry ``images`` (pixel values, one (3, H, W) tensor each) in the order of their
    prompt's image blocks. ``tower_runs`` counts vision-tower passes (once per image and batch)."""

    def __init__(self, target_vlm, drafter=None, num_speculative_tokens: int = 4, **kwargs):
        self.target_vlm = target_vlm.eval()
        self.drafter_vlm = drafter.eval() if drafter is not None and _is_llava(drafter) else None
        self.image_token = int(target_vlm.config.image_token_id)
        self.patches = int(target_vlm.config.image_seq_length)
        target_lm = text_lm(target_vlm)
        drafter_lm = text_lm(drafter) if self.drafter_vlm is not None else drafter
        super().__init__(target_lm, drafter_lm, num_speculative_tokens, **kwargs)
        self.shared_tower = self.drafter_vlm is not None and same_tower(target_vlm, self.drafter_vlm)
        self.tower_runs = 0
        self._queues = [ImageQueue(target_lm.get_input_embeddings(), self.image_token)]
        if drafter_lm is not None:
            self._queues.append(ImageQueue(drafter_lm.get_input_embeddings(), self.image_token))

    def generate(self, requests, on_tokens=None, speculate: bool = True):
        for i, req in enumerate(requests):
            expected = len(getattr(req, "images", ())) * self.patches
            found = sum(1 for t in req.prompt_ids if t == self.image_token)
            if found != expected:
                raise ValueError(
                    f"request {i}: {found} image positions in the prompt for {len(req.images)} image(s) "
                    f"of {self.patches} patches"
                )
        return super().generate(requests, on_tokens, speculate)

    def _decode(self, rows, on_tokens, speculate: bool = True) -> None:
        images = [img for row in rows for img in getattr(row.request, "images", ())]
        if images:
            self._load_images(torch.stack(list(images)))
        try:
            super()._decode(rows, on_tokens, speculate)
        finally:
            for queue in self._queues:
                queue.load(None)

    def _load_images(self, pixels: torch.Tensor) -> None:
        tower = tower_features(self.target_vlm, pixels)
        self.tower_runs += 1
        self._queues[0].load(image_features(self.target_vlm, pixels, tower))
        if self.drafter_vlm is not None and len(self._queues) > 1:
            shared = tower.to(next(self.drafter_vlm.parameters()).device) if self.shared_tower else None
            if shared is None:
                self.tower_runs += 1
            self._queues[1].load(image_features(self.drafter_vlm, pixels, shared))


def _is_llava(model) -> bool:
    return getattr(model.config, "model_type", None) == "llava"
