"""An EAGLE-style feature head for any Hugging Face causal-LM target, with FSPAD's two components.

What the head computes, per position j of a sequence (EAGLE, arXiv 2401.15077):

    input   g_j      the target's feature at j (or, later in a draft chain, the head's own prediction)
            e_{j+1}  the target's (frozen) embedding of the token that follows j
    fuse    x_j = fuse(g_j, e_{j+1})
    layer   one causal Llama decoder layer (transformers' ``LlamaDecoderLayer``, a 1-layer config)
    output  f_{j+1}  the predicted feature at j+1 (regressed onto the target's) and
            logits = the target's frozen LM head applied to it (the next token x_{j+2})

The feature is what the target's LM head reads: ``hidden_states[-1]`` of a transformers model
(after the final norm), as EAGLE's own data scripts take it ("second-to-top layer" in the EAGLE
paper counts the LM head as the top layer). ``feature_layers`` with several indices into
``hidden_states`` gives EAGLE-3's low/mid/high input: the layers are concatenated and a trainable
linear map reduces them to the hidden width before fusion; the head's own predictions (fed back
later in a chain) are in that reduced space, as in EAGLE-3.

FSPAD (Gui et al., arXiv 2408.15562) -- the formulation is taken from the authors' code
(github.com/Luc4Gui/FSPAD: ``eagle/model/cnets_fspad.py``, ``cnets_fspad_wofs.py`` and
``eagle/train/main_fspad.py``), not guessed from the abstract:

* **Feature sampling** (``Efc`` there): the fusion is EAGLE's linear map followed by a residual
  gated MLP whose *gate* is driven by the token embedding and whose *up* branch by the normed
  fused feature: ``x = W[e; g] + b``, ``x = x + down(silu(gate(e)) * up(rmsnorm(x)))``. The
  embedding thus selects ("samples") directions of the high-dimensional feature, telling the head
  which token the target actually emitted.
* **Partial alignment distillation**: the decoder layer's MLP gets a second down projection, so
  the layer returns two features that share attention and the MLP's hidden activations but not
  the output projection: the first goes to the LM head and is trained by the token loss only,
  the second is regressed onto the target's next feature (Smooth L1) and is the one fed back as
  the next input feature when drafting a chain. Feature alignment thus no longer pulls directly on
  the features the logits come from. (The authors' code widens ``down_proj`` to 2H and doubles
  the residual; a separate ``regress_proj`` here is the same computation.)

``variant``: ``eagle`` (neither), ``fspad`` (both), ``fspad-sampling`` / ``fspad-pad`` (one each,
for the ablation; ``fspad-pad`` is the authors' "wofs" model). Differences from the authors' head
kept on purpose by default: transformers' decoder layer keeps its input norm (EAGLE-1 drops it on
its only layer), and the first fusion here carries a bias as theirs does. ``layer_input_norm=False``
and ``fusion_bias=False`` give EAGLE-1's layout exactly, the one vLLM's ``EagleLlamaForCausalLM``
computes (:mod:`sd2_ray.feature.export_vllm` exports only such heads).

Only the head's own weights are parameters: the target's embedding and LM head are used through
detached weights, never copied, never trained, never in ``state_dict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sd2_ray.config import StageConfig

Variant = Literal["eagle", "fspad", "fspad-sampling", "fspad-pad"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class FeatureHeadConfig(StageConfig):
    """Shape and variant of a feature head. The sizes are the target's (``for_target`` copies
    them), so a saved head loads without the target's config at hand."""

    variant: Variant = Field("eagle", description="eagle | fspad | fspad-sampling | fspad-pad")
    feature_layers: tuple[int, ...] = Field(
        (-1,), description="indices into the target's hidden_states; (-1,) = EAGLE-1, several = EAGLE-3"
    )
    hidden_size: int = Field(..., ge=1)
    vocab_size: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)
    num_key_value_heads: int = Field(..., ge=1)
    intermediate_size: int = Field(..., ge=1, description="MLP width of the head's decoder layer")
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # layout switches: the defaults are this head's own; EAGLE-1 (and vLLM's
    # EagleLlamaForCausalLM, which an exported head must match exactly) has neither
    fusion_bias: bool = Field(True, description="the fusion's linear map [embedding; feature] -> H has a bias")
    layer_input_norm: bool = Field(
        True, description="the decoder layer RMS-normalises its input (EAGLE-1 and vLLM's EAGLE skip it)"
    )

    @property
    def feature_sampling(self) -> bool:
        return self.variant in ("fspad", "fspad-sampling")

    @property
    def partial_alignment(self) -> bool:
        return self.variant in ("fspad", "fspad-pad")

    @classmethod
    def for_target(cls, target_config, variant: Variant = "eagle", **overrides) -> FeatureHeadConfig:
        """A head config sized like ``target_config`` (any transformers config with the usual names)."""
        heads = target_config.num_attention_heads
        rope = getattr(target_config, "rope_parameters", None) or {}
        fields = dict(
            variant=variant,
            hidden_size=target_config.hidden_size,
            vocab_size=target_config.vocab_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            intermediate_size=target_config.intermediate_size,
            rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", getattr(target_config, "rope_theta", 10000.0)),
            max_position_embeddings=getattr(target_config, "max_position_embeddings", 4096),
        )
        fields.update(overrides)
        return cls(**fields)

    def layer_config(self):
        """The 1-layer Llama config of the head's decoder layer. Eager attention: it takes the
        additive 4D mask built here for any padding side."""
        from transformers import LlamaConfig

        config = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_hidden_layers=1,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.max_position_embeddings,
        )
        config._attn_implementation = "eager"
        return config


def low_mid_high_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """EAGLE-3-style feature layers as indices into hidden_states: first block, middle, last (the
    last entry of hidden_states is the LM head's input)."""
    return tuple(sorted({1, max(1, num_hidden_layers // 2), -1 % (num_hidden_layers + 1)}))


@dataclass(frozen=True)
class FrozenTargetParts:
    """The target modules the head reads; a plain object, so nn.Module registers none of them."""

    embed: nn.Module
    lm_head: nn.Module


@dataclass
class HeadOutput:
    logit_features: torch.Tensor  # (B, T, H): what the LM head reads
    regress_features: torch.Tensor  # (B, T, H): aligned to the target's next feature; fed back in chains
    logits: torch.Tensor  # (B, T, V)


class LinearFusion(nn.Module):
    """EAGLE's fusion: one linear map of [embedding; feature]."""

    def __init__(self, hidden: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=bias)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([embeds, features], dim=-1))


class FeatureSampling(nn.Module):
    """FSPAD's fusion (``Efc`` in the authors' code): EAGLE's linear fusion, then a residual gated
    MLP gated by the token embedding."""

    def __init__(self, config: FeatureHeadConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.fusion_bias)
        self.norm = _rms_norm(config)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        fused = self.fc(torch.cat([embeds, features], dim=-1))
        sampled = self.down_proj(F.silu(self.gate_proj(embeds)) * self.up_proj(self.norm(fused)))
        return fused + sampled


class FeatureHead(nn.Module):
    """The trainable head; ``target`` lends its embedding and LM head (frozen, not copied)."""

    def __init__(self, config: FeatureHeadConfig, target):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = config
        self.frozen = FrozenTargetParts(target.get_input_embeddings(), target.get_output_embeddings())
        hidden = config.hidden_size
        layers = len(config.feature_layers)
        # EAGLE-3: several target layers reduced to one feature width before fusion
        self.reduce = nn.Linear(layers * hidden, hidden, bias=False) if layers > 1 else None
        self.fuse: nn.Module = (
            FeatureSampling(config) if config.feature_sampling else LinearFusion(hidden, config.fusion_bias)
        )
        layer_config = config.layer_config()
        self.layer = LlamaDecoderLayer(layer_config, layer_idx=0)
        if not config.layer_input_norm:  # EAGLE-1's layout: the fused input goes to attention as is
            self.layer.input_layernorm = nn.Identity()
        self.rotary = LlamaRotaryEmbedding(config=layer_config)
        # partial alignment: a second output projection of the MLP for the regressed feature
        self.regress_proj = (
            nn.Linear(config.intermediate_size, hidden, bias=False) if config.partial_alignment else None
        )

    def reduce_features(self, target_features: torch.Tensor) -> torch.Tensor:
        """The target's (concatenated) layer features -> the head's input feature width."""
        return self.reduce(target_features) if self.reduce is not None else target_features

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen: gradients stop here whatever the target's flags say
            return self.frozen.embed(token_ids)

    def lm_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's LM head on the head's features: gradients reach the features, never the
        head's weights (they are the target's)."""
        weight = cast(torch.Tensor, self.frozen.lm_head.weight)
        bias = cast("torch.Tensor | None", getattr(self.frozen.lm_head, "bias", None))
        return F.linear(features, weight.detach(), bias.detach() if bias is not None else None)

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor, attention_mask: torch.Tensor) -> HeadOutput:
        """``features`` (B, T, H) in the head's input space; ``next_ids`` (B, T) the token after
        each feature's position; ``attention_mask`` (B, T) 1 = real, padding on either side."""
        embeds = self.embed(next_ids).to(features.dtype)
        fused = self.fuse(embeds, features)
        mask = attention_mask.bool()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logit_features, regress_features = self._layer(fused, positions, _causal_mask(mask, fused.dtype))
        return HeadOutput(logit_features, regress_features, self.lm_logits(logit_features))

    def _layer(self, hidden: torch.Tensor, positions: torch.Tensor, mask4d: torch.Tensor):
        """LlamaDecoderLayer's computation, unrolled so the MLP's hidden activations can feed a
        second output projection (partial alignment); without it both outputs are the same."""
        layer = self.layer
        attn_out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            position_embeddings=self.rotary(hidden, positions),
            attention_mask=mask4d,
        )
        hidden = hidden + attn_out
        mlp = layer.mlp
        normed = layer.post_attention_layernorm(hidden)
        inner = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        logit_features = hidden + mlp.down_proj(inner)
        if self.regress_proj is None:
            return logit_features, logit_features
        return logit_features, hidden + self.regress_proj(inner)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, out_dir: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` of the head's own weights only."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS_NAME))

    @classmethod
    def load(cls, head_dir: str | Path, target) -> FeatureHead:
        """A saved head, bound to ``target`` (which must be the one it was trained for)."""
        from safetensors.torch import load_file

        head_path = Path(head_dir)
        config = FeatureHeadConfig(**json.loads((head_path / CONFIG_NAME).read_text()))
        head = cls(config, target)
        head.load_state_dict(load_file(str(head_path / WEIGHTS_NAME)), strict=True)
        weight = target.get_input_embeddings().weight
        return head.to(device=weight.device, dtype=weight.dtype)


def _rms_norm(config: FeatureHeadConfig) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask: a query sees earlier real keys. A fully masked row (a padding
    query) gets a uniform softmax, not NaN, since the masked value is finite."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & mask.unsqueeze(1)
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
