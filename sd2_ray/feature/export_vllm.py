"""Export a trained feature head as a speculative model vLLM's EAGLE path loads (vLLM 0.32).

``LLM(model=target, speculative_config={"method": "eagle", "model": out_dir,
"num_speculative_tokens": K})`` builds ``EagleLlamaForCausalLM``
(``vllm/model_executor/models/llama_eagle.py``) from the exported directory. What that model
computes, read from its source, and how a head maps onto it:

* input: the token embedding and the target's feature, ``fc(cat(embed, feature))`` with
  ``fc`` a bias-free Linear(2H -> H) (a ``fc.bias`` in a checkpoint is *silently ignored*: the
  weight loader skips every unexpected ``.bias``, so a head with a fusion bias would load and
  draft differently; the export refuses it instead);
* the feature is the target model's output hidden state, i.e. after its final norm (the model
  runner passes ``hidden_states``, the tensor the target's LM head reads, not an aux/pre-norm
  state), exactly ``hidden_states[-1]`` of a transformers target, what the head trains on;
* one Llama decoder layer whose ``input_layernorm`` is replaced by ``nn.Identity`` (EAGLE-1 drops
  it), then no final norm: the layer's output goes both to the LM head and, fed back, to the
  next draft step -- as the eagle head's single feature does here;
* ``embed_tokens`` and ``lm_head`` are the target's when the checkpoint has none (vLLM shares
  them), as the head uses the target's frozen ones;
* weight names: ``fc.weight`` and ``layers.0.*`` in transformers' Llama naming (vLLM prefixes
  ``model.`` itself and stacks q/k/v and gate/up); config.json is a 1-layer Llama config with
  ``architectures: ["EagleLlamaForCausalLM"]``.

So only ``variant="eagle"`` heads with ``feature_layers=(-1,)``, ``fusion_bias=False`` and
``layer_input_norm=False`` are exact; everything else is refused with a one-line
:class:`sd2_ray.errors.ConfigError`. EAGLE-3 (several feature layers) is refused too: vLLM's
``Eagle3LlamaForCausalLM`` is another network (its layer attends over
``[norm(embedding); norm(feature)]`` with a 2H-wide qkv, and a final norm precedes the LM head),
not a re-labelling of this head's linear fusion.

Pure file work (safetensors + json): no target model is loaded, no Ray, no vLLM import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sd2_ray.errors import ConfigError
from sd2_ray.feature.head import CONFIG_NAME, WEIGHTS_NAME, FeatureHeadConfig

ARCHITECTURE = "EagleLlamaForCausalLM"
# head state_dict prefix -> vLLM checkpoint prefix (vLLM adds "model." itself)
_PREFIXES = {"fuse.fc.": "fc.", "layer.": "layers.0."}
# the Llama layer's tensors vLLM's EAGLE layer 0 holds (no input_layernorm: it is an Identity there)
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
EXPORTED_NAMES = frozenset({"fc.weight", *(f"layers.0.{name}" for name in LAYER_TENSORS)})


def check_exportable(config: FeatureHeadConfig, target_config: dict) -> None:
    """Refuse, with the reason, a head vLLM's EagleLlamaForCausalLM would not compute exactly."""
    if config.variant != "eagle":
        raise ConfigError(
            f"variant {config.variant!r}: vLLM's EagleLlamaForCausalLM has no feature-sampling MLP and no "
            "second (partial-alignment) output projection; export an 'eagle' head"
        )
    layers = target_config.get("num_hidden_layers")
    if len(config.feature_layers) > 1:
        raise ConfigError(
            f"feature_layers {config.feature_layers}: vLLM's Eagle3LlamaForCausalLM attends over "
            "[norm(embedding); norm(feature)] and norms its output, not this head's linear fusion; "
            "export an EAGLE-1 head (feature_layers (-1,))"
        )
    if config.feature_layers[0] not in (-1, layers):
        raise ConfigError(
            f"feature_layers {config.feature_layers}: vLLM's EAGLE feeds the target's last (normed) hidden "
            "state only; export a head trained on feature_layers (-1,)"
        )
    if config.fusion_bias:
        raise ConfigError(
            "fusion_bias true: vLLM's EAGLE fc has no bias (it silently ignores fc.bias); "
            "train the head with fusion_bias=False"
        )
    if config.layer_input_norm:
        raise ConfigError(
            "layer_input_norm true: vLLM's EAGLE layer 0 has no input norm (EAGLE-1 drops it); "
            "train the head with layer_input_norm=False"
        )
    for name in ("hidden_size", "vocab_size"):
        if target_config.get(name) != getattr(config, name):
            raise ConfigError(
                f"{name}: the head has {getattr(config, name)}, the target {target_config.get(name)}; "
                "export a head with the target it was trained for"
            )


def vllm_weight_names(state: dict) -> dict[str, str]:
    """{head name: vLLM checkpoint name} for every tensor of an exportable head's state."""
    names = {}
    for key in state:
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ConfigError(f"head tensor {key!r} has no place in vLLM's EagleLlamaForCausalLM")
        names[key] = _PREFIXES[prefix] + key[len(prefix) :]
    if set(names.values()) != EXPORTED_NAMES:
        missing = sorted(EXPORTED_NAMES - set(names.values()))
        extra = sorted(set(names.values()) - EXPORTED_NAMES)
        raise ConfigError(f"head weights do not match vLLM's EAGLE layer: missing {missing}, unexpected {extra}")
    return names


def vllm_config_dict(config: FeatureHeadConfig, target_config: dict) -> dict:
    """config.json of the export: the head's own 1-layer Llama config (its rope, eps and widths,
    which may differ from the target's), named as vLLM's EAGLE-1 Llama drafter."""
    layer = config.layer_config().to_dict()
    for private in ("_attn_implementation", "_attn_implementation_autoset"):
        layer.pop(private, None)
    layer.update(
        architectures=[ARCHITECTURE],
        model_type="llama",
        num_hidden_layers=1,
        head_dim=config.hidden_size // config.num_attention_heads,
        tie_word_embeddings=False,  # no LM head of its own: vLLM shares the target's
        dtype=target_config.get("dtype") or target_config.get("torch_dtype") or "float32",
        sd2_feature_head=config.model_dump(mode="json"),  # provenance; vLLM ignores unknown keys
    )
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if token in target_config:
            layer[token] = target_config[token]
    return layer


def export_for_vllm(head_dir: str | Path, target_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json + model.safetensors) for vLLM's ``method: eagle`` from a
    head saved by :meth:`sd2_ray.feature.head.FeatureHead.save` for the target at ``target_dir``.
    Raises :class:`ConfigError` for a head vLLM would not compute exactly."""
    from safetensors.torch import load_file, save_file

    head_path, out = Path(head_dir), Path(out_dir)
    config = FeatureHeadConfig(**json.loads((head_path / CONFIG_NAME).read_text()))
    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    check_exportable(config, target_config)
    state = load_file(str(head_path / WEIGHTS_NAME))
    names = vllm_weight_names(state)
    out.mkdir(parents=True, exist_ok=True)
    save_file({names[k]: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(vllm_config_dict(config, target_config), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m sd2_ray.feature.export_vllm HEAD_DIR TARGET_DIR OUT_DIR``"""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m sd2_ray.feature.export_vllm HEAD_DIR TARGET_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        print(export_for_vllm(*args))
    except ConfigError as err:
        print(f"export_vllm: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
