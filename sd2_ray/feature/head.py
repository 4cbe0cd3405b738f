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
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from sd2_ray.feature.config import FeatureHeadConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
            self.layer.input_layernorm = nn.Identity()  # type: ignore[assignment]
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

    def step(
        self,
        features: torch.Tensor,
        next_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values,
        use_cache: bool = True,
        logits_to_keep: int = 1,
    ) -> HeadOutput:
        """:meth:`forward` over a chunk of new positions on a KV cache (decoding): the caller
        gives the positions and the 4D additive mask over cache + chunk (what
        :class:`~sd2_ray.specdec.static_kv.StaticKV` builds); ``past_key_values`` takes the
        chunk's keys and values. Logits of the last ``logits_to_keep`` columns (0: all); the
        default, 1, is the next draft's."""
        embeds = self.embed(next_ids).to(features.dtype)
        fused = self.fuse(embeds, features)
        logit_features, regress_features = self._layer(fused, position_ids, attention_mask, past_key_values)
        return HeadOutput(logit_features, regress_features, self.lm_logits(logit_features[:, -logits_to_keep:]))

    def _layer(self, hidden: torch.Tensor, positions: torch.Tensor, mask4d: torch.Tensor, past_key_values=None):
        """LlamaDecoderLayer's computation, unrolled so the MLP's hidden activations can feed a
        second output projection (partial alignment); without it both outputs are the same."""
        layer = self.layer
        attn_out, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            position_embeddings=self.rotary(hidden, positions),
            attention_mask=mask4d,
            past_key_values=past_key_values,
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
        save_config(self.config, out)
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


def save_config(config: FeatureHeadConfig, out_dir: str | Path) -> None:
    """A head's ``config.json`` (what :meth:`FeatureHead.load` and :func:`is_feature_head` read)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")


def head_from_checkpoint(directory: str, final_head: str, out_dir: str) -> None:
    """The head of an intermediate DeepSpeed checkpoint (the fine-tune's loss module holds it as
    ``lm``), in the dtype and with the config of the final head, written to ``out_dir``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file, save_file

    from sd2_ray.finetune.checkpoint import DS_TAG, LM_PREFIX

    final = load_file(str(Path(final_head) / WEIGHTS_NAME))
    state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=DS_TAG)
    weights = {k[len(LM_PREFIX) :]: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    if set(weights) != set(final):
        raise RuntimeError(f"{directory}: the checkpoint's weights are not the head's")
    config = FeatureHeadConfig(**json.loads((Path(final_head) / CONFIG_NAME).read_text()))
    save_config(config, out_dir)
    weights = {k: v.to(final[k].dtype).contiguous() for k, v in weights.items()}
    save_file(weights, str(Path(out_dir) / WEIGHTS_NAME))


def is_feature_head(model_dir: str | Path) -> bool:
    """Whether a local model dir holds a feature head (its config names a variant and the target
    layers it reads) rather than a standalone drafter."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return "variant" in config and "feature_layers" in config


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
