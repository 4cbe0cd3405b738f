"""Lossless speculative decoding with images: the engine's loop, unchanged, over the LM half of a
LLaVA target and drafter, with the image features put in place of the ``<image>`` tokens when a
batch's prompts are prefilled.

How: each side's LM is a plain causal LM sharing the LLaVA checkpoint's weights
(:func:`text_lm`), and a pre-hook on it (:class:`PrefillImages`) turns the batch's prefill (its
first forward) into ``inputs_embeds`` with each row's image features at its prompt's
``<image>`` positions, exactly as LLaVA's own merge (``masked_scatter``) fills them. Features
are computed once per image and batch: the vision tower runs once and its output feeds the
target's projector and, when the drafter carries the same tower (a MASSV drafter does), the
drafter's projector too. A text-only drafter gets no hook: its ``<image>`` ids read as that
token's own embedding. After the prefill, decoding never sees an image again, so the steady
loop (and its compiled steps) is the text engine's.
"""

from __future__ import annotations

import torch

from sd2_ray.specdec.engine import SpeculativeEngine


class PrefillImages:
    """A forward pre-hook on one side's LM: its next forward (the batch's prefill, the first pass
    of the loop) takes ``inputs_embeds`` with each row's first ``<image>`` positions (its
    prompt's, as a prompt comes before anything drafted in the same chunk) set to that row's
    image features, in order, as LLaVA's own merge fills them; then the hook goes away.

    Per side and per row, not a queue on the embedding: a drafter can draft the ``<image>`` id,
    which then sits in the target's prefill chunk right after that row's prompt (it must read as
    the token's own embedding, as in LLaVA's decoding), and a drafter that *is* the target shares
    its embedding module with it, yet each side's prefill needs the features once."""

    def __init__(self, lm, image_token: int):
        self.lm, self.image_token = lm, image_token
        self.rows: list[torch.Tensor] | None = None
        self._handle = None

    def load(self, rows: list[torch.Tensor] | None) -> None:
        """Per row of the next batch, its (positions, hidden) features (empty for a text row);
        None: nothing to fill (and the hook removed)."""
        self.rows = rows if rows is not None and any(len(r) for r in rows) else None
        if self.rows is not None and self._handle is None:
            self._handle = self.lm.register_forward_pre_hook(self._fill, with_kwargs=True)
        elif self.rows is None and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _fill(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        rows = self.rows
        if ids is None or rows is None:
            return None
        if ids.shape[0] != len(rows):
            raise ValueError(f"prefill of {ids.shape[0]} rows for images of {len(rows)}")
        embeds = self.lm.get_input_embeddings()(ids).clone()
        for b, features in enumerate(rows):
            if not len(features):
                continue
            where = (ids[b] == self.image_token).nonzero().flatten()
            if len(where) < len(features):
                raise ValueError(f"row {b}: {len(where)} image positions in its prefill for {len(features)} features")
            embeds[b, where[: len(features)]] = features.to(embeds.device, embeds.dtype)
        self.load(None)  # decoding never sees an image again: the steady loop runs hook-free
        return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds}


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
        if self.drafter_vlm is not None and int(self.drafter_vlm.config.image_seq_length) != self.patches:
            raise ValueError(
                f"drafter sees an image as {self.drafter_vlm.config.image_seq_length} positions, "
                f"the target as {self.patches}: their prompts would not line up"
            )
        target_lm = text_lm(target_vlm)
        drafter_lm = text_lm(drafter) if self.drafter_vlm is not None else drafter
        super().__init__(target_lm, drafter_lm, num_speculative_tokens, **kwargs)
        self.shared_tower = self.drafter_vlm is not None and same_tower(target_vlm, self.drafter_vlm)
        self.tower_runs = 0
        self._fills = [PrefillImages(target_lm, self.image_token)]
        if self.drafter_vlm is not None:
            self._fills.append(PrefillImages(drafter_lm, self.image_token))

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
        # only the rows that decode (a zero budget never reaches here): their images, in order
        counts = [len(getattr(row.request, "images", ())) for row in rows]
        if sum(counts):
            images = torch.stack([img for row in rows for img in row.request.images])
            self._load_images(images, counts)
        try:
            super()._decode(rows, on_tokens, speculate)
        finally:
            for fill in self._fills:
                fill.load(None)

    def _load_images(self, pixels: torch.Tensor, counts: list[int]) -> None:
        split = [n * self.patches for n in counts]
        tower = tower_features(self.target_vlm, pixels)
        self.tower_runs += 1
        self._fills[0].load(list(image_features(self.target_vlm, pixels, tower).split(split)))
        if self.drafter_vlm is not None:
            shared = None
            if self.shared_tower:
                param = next(self.drafter_vlm.parameters())
                shared = tower.to(param.device, param.dtype)
            else:
                self.tower_runs += 1
            self._fills[1].load(list(image_features(self.drafter_vlm, pixels, shared).split(split)))


def _is_llava(model) -> bool:
    return getattr(model.config, "model_type", None) == "llava"
