"""The embedded model kit: loads, is trained, leaves room for alignment, is deterministic and cached.

The full kit is built once per machine (session fixture ``kit_dir``, shared with every other
test); determinism and cache behaviour are checked on a reduced-steps kit built here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

# Bounds stated up front (measured figures: see kit.json of the default build).
TARGET_HELDOUT_BOUND = 4.75  # nats/token on held-out stdlib files (measured 4.15); ln(2048) = 7.62
MAL_K = 4
MAL_RANGE = (1.2, 3.2)  # measured 2.70 (K=4, at most 5): room left for alignment

SMALL = dict(
    corpus_chars=200_000,
    vocab_size=512,
    uag_vocab_size=400,
    seq_len=192,  # a RAG passage of three functions fits at vocab 512
    batch_size=2,
    target_steps=3,
    drafter_steps=2,
    uag_steps=2,
    train_prompts=16,
    eval_prompts=4,
    heldout_windows=2,
    measure_mal=False,
    vision_tower_steps=2,
    vision_steps=2,
    vision_train_prompts=8,
    vision_eval_prompts=4,
    vision_captions=4,
)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A private cache for the reduced kits' trained parts (kept out of the user's cache)."""
    return str(tmp_path_factory.mktemp("kit-cache"))


@pytest.fixture(scope="module")
def small_kit(tmp_path_factory, small_cache):
    from sd2_ray.kit import ensure_kit

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD2_CACHE_DIR", small_cache)
        return ensure_kit(str(tmp_path_factory.mktemp("kits") / "small-a"), **SMALL)


@pytest.fixture
def in_small_cache(small_cache, monkeypatch):
    monkeypatch.setenv("SD2_CACHE_DIR", small_cache)


def _closest_layer_drop(dense_macs, blocks_dense_macs, layers, sparsity):
    """(blocks dropped, |their MACs - sparse MACs| / sparse MACs) of the best-matched layer baseline."""
    per_block = blocks_dense_macs / layers
    sparse = dense_macs - sparsity * blocks_dense_macs
    n = min(range(1, layers), key=lambda n: abs(dense_macs - n * per_block - sparse))
    return n, abs(dense_macs - n * per_block - sparse) / sparse


def test_drafter_is_deep_enough_for_a_matched_layer_baseline(kit_dir):
    """The drafter has the configured shape; dropping whole blocks matches the MACs of 50 %
    (and 2:4) and 70 % sparse blocks within 5 % (``drop_layers: auto``), the 50 % drafter cuts
    >= 35 % of the dense MACs, and drafting pays in MACs (c <= 0.2)."""
    from sd2_ray.kit.config import KitConfig
    from sd2_ray.models.io import load_model
    from sd2_ray.models.macs import linear_macs

    shape = KitConfig.load(os.path.join(kit_dir, "config.yaml")).drafter_shape()
    model = load_model(os.path.join(kit_dir, "drafter"))
    cfg = model.config
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    ) == (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate)
    drafter = linear_macs(model)
    target = linear_macs(load_model(os.path.join(kit_dir, "target")))
    assert shape.layers >= 8 and drafter["macs"] / target["macs"] <= 0.2
    for sparsity in (0.5, 0.7):
        n, gap = _closest_layer_drop(drafter["dense_macs"], drafter["blocks_dense_macs"], shape.layers, sparsity)
        assert gap <= 0.05, (sparsity, n, gap)
        if (sparsity * shape.layers).is_integer():  # equal blocks: the match is exact
            assert n == sparsity * shape.layers and gap == pytest.approx(0.0, abs=1e-12)
    assert 1 - (drafter["dense_macs"] - 0.5 * drafter["blocks_dense_macs"]) / drafter["dense_macs"] >= 0.35


def test_drafter_shape_comes_from_the_config_and_decides_only_its_part():
    from sd2_ray.errors import ConfigError
    from sd2_ray.kit import shapes
    from sd2_ray.kit.cache import content_hash, part_hash
    from sd2_ray.kit.config import KitConfig

    base = KitConfig()
    assert base.drafter_shape() == shapes.DRAFTER
    wider = KitConfig(drafter_hidden=2 * shapes.HEAD_DIM, drafter_layers=4, drafter_intermediate=384)
    shape = wider.drafter_shape()
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate) == (128, 4, 2, 1, 384)
    assert content_hash(wider) != content_hash(base)
    assert part_hash(wider, "drafter") != part_hash(base, "drafter")
    for name in ("target", "drafter-uag"):  # the other models' trained parts stay valid
        assert part_hash(wider, name) == part_hash(base, name)
    with pytest.raises(ConfigError, match="drafter_hidden"):
        KitConfig.load(overrides={"drafter_hidden": 96})


def test_kit_loads_with_auto_classes(kit_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.load(open(os.path.join(kit_dir, "kit.json")))
    expected = {"target": "LlamaForCausalLM", "drafter": "LlamaForCausalLM", "drafter-uag": "Qwen2ForCausalLM"}
    vocabs = {}
    for name, arch in expected.items():
        path = os.path.join(kit_dir, name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        assert type(model).__name__ == arch
        assert sum(p.numel() for p in model.parameters()) == info["models"][name]["params"]
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert head_dim in (32, 64)  # vLLM CPU sizes
        assert getattr(model.config, "head_dim", None) in (None, head_dim)  # a stated one agrees
        assert len(tok) == model.config.vocab_size
        assert tok.eos_token == "<|end|>" and model.config.eos_token_id == tok.eos_token_id
        vocabs[name] = len(tok)
    assert vocabs["target"] == vocabs["drafter"] != vocabs["drafter-uag"]
    from sd2_ray.kit.config import KitConfig

    assert (
        info["models"]["drafter"]["shape"]
        == KitConfig.load(os.path.join(kit_dir, "config.yaml")).drafter_shape().__dict__
    )
    target_params, drafter_params = (info["models"][n]["params"] for n in ("target", "drafter"))
    assert 2_000_000 <= target_params <= 10_000_000 and drafter_params < target_params / 3


def test_prompt_sets_are_valid_and_disjoint(kit_dir):
    from sd2_ray.kit.tasks import TASKS
    from sd2_ray.rows import row_problem

    train = read_jsonl(os.path.join(kit_dir, "prompts", "train.jsonl"))
    evals = read_jsonl(os.path.join(kit_dir, "prompts", "eval.jsonl"))
    assert len(train) == 768 and len(evals) == 96
    openings = {
        "code": "Complete this Python function:",
        "summarization": "Summarise this Python function",
        "translation": "Translate into Pig Latin:",
        "rag": "Answer from the passage.",
        "math_reasoning": "Compute ",
        "mt_bench": "Complete this Python function:",
    }
    for row in train + evals:
        assert row_problem(row) is None, row
        assert row["messages"][0]["role"] == "user" and row["response"].strip()
        assert row["messages"][0]["content"].startswith(openings[row["category"]]), row
    # round-robin: the first 64 (tiny.yaml's eval) and every 6 rows hold each task once
    for rows in (train, evals):
        assert [r["category"] for r in rows[:12]] == list(TASKS) * 2
        assert {r["category"] for r in rows[:64]} == set(TASKS)
    assert len({r["id"] for r in train + evals}) == len(train) + len(evals)
    conversation = lambda r: json.dumps(r["messages"])  # noqa: E731
    assert not {conversation(r) for r in train} & {conversation(r) for r in evals}


def test_target_heldout_loss_far_below_uniform(kit_dir):
    """Recomputed here from the held-out stdlib files, not read back from kit.json."""
    import torch

    from sd2_ray.kit.config import KitConfig
    from sd2_ray.kit.corpus import load_corpus
    from sd2_ray.kit.tokenizer import token_stream
    from sd2_ray.models.io import load_model, load_tokenizer

    config = KitConfig.load(os.path.join(kit_dir, "config.yaml"))
    corpus = load_corpus(config.corpus_chars, config.heldout_fraction, config.seed)
    tok = load_tokenizer(os.path.join(kit_dir, "target"))
    stream = torch.tensor(token_stream(tok, corpus.heldout_texts()))
    windows = torch.stack([stream[i * 4096 : i * 4096 + 256] for i in range(8)])
    model = load_model(os.path.join(kit_dir, "target"))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    info = json.load(open(os.path.join(kit_dir, "kit.json")))
    assert info["models"]["target"]["ln_vocab"] == pytest.approx(math.log(len(tok)))
    assert loss < TARGET_HELDOUT_BOUND < math.log(len(tok)) - 2, loss
    assert info["models"]["target"]["heldout_loss"] < TARGET_HELDOUT_BOUND
    # the same-family drafter is pretrained mostly on stdlib text (long, so that pruning has
    # knowledge to lose) and a quarter on the tasks' reference answers: it knows every task (what
    # the fine-tune may leave out) but not the target's own answers, which decide acceptance
    models = info["models"]
    assert models["drafter"]["heldout_loss"] < math.log(len(tok)) - 2
    assert models["drafter"]["eval_chat_loss"] < math.log(len(tok)) - 3


def test_target_answers_every_task_better_than_a_uniform_guess(kit_dir):
    """Recomputed here on each task's held-out rows (the reference answers' tokens only), and
    checked against kit.json's figures."""
    from sd2_ray.kit.tasks import TASKS
    from sd2_ray.kit.training import response_loss
    from sd2_ray.models.io import load_model, load_tokenizer

    tok = load_tokenizer(os.path.join(kit_dir, "target"))
    model = load_model(os.path.join(kit_dir, "target"))
    evals = read_jsonl(os.path.join(kit_dir, "prompts", "eval.jsonl"))
    recorded = json.load(open(os.path.join(kit_dir, "kit.json")))["models"]["target"]["eval_response_loss_by_task"]
    uniform = math.log(len(tok))
    for task in TASKS:
        rows = [r for r in evals if r["category"] == task][:8]
        loss = response_loss(model, tok, rows)
        print(f"{task}: held-out answer loss {loss:.3f} nats/token (uniform {uniform:.3f})")
        assert loss < uniform - 1.0, (task, loss)
        assert recorded[task] < uniform - 1.0, (task, recorded[task])


def _chat_prompt_ids(tok, rows):
    return [
        tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for r in rows
    ]


def _mal(kit_dir, prompts, k, max_new_tokens):
    """MAL with the project's engine when it is there, else the kit's simple greedy check."""
    try:
        from sd2_ray.specdec.engine import SpeculativeEngine
        from sd2_ray.specdec.types import GenerationRequest
    except ImportError:
        from sd2_ray.kit.measure import greedy_mal
        from sd2_ray.models.io import load_model

        target, drafter = load_model(os.path.join(kit_dir, "target")), load_model(os.path.join(kit_dir, "drafter"))
        return greedy_mal(
            target, drafter, prompts, k=k, max_new_tokens=max_new_tokens, eos_id=target.config.eos_token_id
        )["mean_accepted_length"]
    engine = SpeculativeEngine.from_dirs(
        os.path.join(kit_dir, "target"), os.path.join(kit_dir, "drafter"), num_speculative_tokens=k
    )
    results = engine.generate([GenerationRequest(prompt_ids=p, max_new_tokens=max_new_tokens) for p in prompts])
    passes = sum(r.stats.target_passes for r in results)
    return sum(r.stats.committed_tokens for r in results) / passes


def test_drafter_base_mal_leaves_room_for_alignment(kit_dir):
    from sd2_ray.models.io import load_tokenizer

    tok = load_tokenizer(os.path.join(kit_dir, "target"))
    rows = read_jsonl(os.path.join(kit_dir, "prompts", "eval.jsonl"))[:16]
    mal = _mal(kit_dir, _chat_prompt_ids(tok, rows), MAL_K, 32)
    print(f"drafter base greedy MAL at K={MAL_K}: {mal:.3f}")
    assert MAL_RANGE[0] <= mal <= MAL_RANGE[1], mal


def test_chat_template_renders_and_eos_stops_generation(kit_dir):
    import torch

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import render_prompt

    for name in ("target", "drafter-uag"):
        tok = load_tokenizer(os.path.join(kit_dir, name))
        msgs = [{"role": "user", "content": "hi"}]
        assert (
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == "<|user|>hi<|end|>\n<|assistant|>"
        )
        assert tok.apply_chat_template(msgs, tokenize=False) == "<|user|>hi<|end|>\n"
        ids = tok("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.eos_token_id
    tok = load_tokenizer(os.path.join(kit_dir, "target"))
    model = load_model(os.path.join(kit_dir, "target"))
    assert model.generation_config.eos_token_id == tok.eos_token_id
    rows = read_jsonl(os.path.join(kit_dir, "prompts", "eval.jsonl"))[:8]
    stopped = 0
    for row in rows:
        ids = tok(render_prompt(row, tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=96, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            stopped += 1
            assert new.index(tok.eos_token_id) == len(new) - 1  # nothing is generated after <|end|>
    # a 3.7M-parameter target often loops instead of closing its turn; some answers must close
    assert stopped >= 1, f"no answer of {len(rows)} ended with <|end|>"


@pytest.fixture
def builds(monkeypatch):
    """Kit builds started in this test: ``build_kit`` wrapped to record each output, still building."""
    import sd2_ray.kit.build

    started: list[str] = []
    real = sd2_ray.kit.build.build_kit

    def recording(config, out, digest):
        started.append(out)
        return real(config, out, digest)

    monkeypatch.setattr(sd2_ray.kit.build, "build_kit", recording)
    return started


def test_cached_call_does_not_rebuild(kit_dir, builds):
    from sd2_ray.kit import ensure_kit

    kit_json = os.path.join(kit_dir, "kit.json")
    before = os.stat(kit_json).st_mtime_ns
    assert ensure_kit() == kit_dir
    assert builds == [] and os.stat(kit_json).st_mtime_ns == before


def test_same_seed_gives_identical_weights(small_kit, tmp_path, in_small_cache):
    from safetensors.torch import load_file

    from sd2_ray.kit import ensure_kit

    # reuse_trained=False: really train again instead of loading the first build's models
    other = ensure_kit(str(tmp_path / "small-b"), **SMALL, reuse_trained=False)
    reseeded = ensure_kit(str(tmp_path / "small-c"), **{**SMALL, "seed": 1})
    for name in ("target", "drafter", "drafter-uag"):
        a = load_file(os.path.join(small_kit, name, "model.safetensors"))
        b = load_file(os.path.join(other, name, "model.safetensors"))
        c = load_file(os.path.join(reseeded, name, "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), name
        assert not all(a[k].equal(c[k]) for k in a if k in c), name  # the seed matters
        tok_a = open(os.path.join(small_kit, name, "tokenizer.json")).read()
        assert tok_a == open(os.path.join(other, name, "tokenizer.json")).read()
    for split in ("train", "eval"):
        rel = os.path.join("prompts", f"{split}.jsonl")
        assert read_jsonl(os.path.join(small_kit, rel)) == read_jsonl(os.path.join(other, rel))
    ka, kb = (json.load(open(os.path.join(d, "kit.json"))) for d in (small_kit, other))
    assert ka["content_hash"] == kb["content_hash"]
    assert ka["models"]["target"]["heldout_loss"] == kb["models"]["target"]["heldout_loss"]


def test_stale_or_unfinished_kit_is_rebuilt(small_kit, tmp_path, in_small_cache, builds):
    import shutil

    from sd2_ray import manifest
    from sd2_ray.kit import ensure_kit

    copy = str(tmp_path / "copy")
    shutil.copytree(small_kit, copy)
    assert ensure_kit(copy, **SMALL) == copy and builds == []  # current: reused, not rebuilt
    manifest.start(copy, "kit")  # looks like an interrupted build
    weights = os.path.join(copy, "target", "model.safetensors")
    os.remove(weights)
    assert ensure_kit(copy, **SMALL) == copy and len(builds) == 1
    assert manifest.is_complete(copy) and os.path.isfile(weights)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".kit-")]  # no temp dirs left


def test_content_hash_tracks_content_not_placement():
    from sd2_ray.kit.cache import content_hash
    from sd2_ray.kit.config import KitConfig

    base = content_hash(KitConfig())
    assert content_hash(KitConfig(out="/somewhere", overwrite=True)) == base
    assert content_hash(KitConfig(seed=1)) != base
    assert content_hash(KitConfig(target_steps=1)) != base


def test_config_rejects_bad_values():
    from sd2_ray.errors import ConfigError
    from sd2_ray.kit.config import KitConfig

    with pytest.raises(ConfigError, match="uag_vocab_size|vocab"):
        KitConfig.load(overrides={"vocab_size": 1000, "uag_vocab_size": 1000})
    with pytest.raises(ConfigError, match="out"):
        KitConfig.load(overrides={"out": "s3://bucket/kit"})
    with pytest.raises(ConfigError, match="target_stpes"):
        KitConfig.load(overrides={"target_stpes": 3})


def test_cli_prints_location_and_figures(small_kit, capsys, in_small_cache):
    from sd2_ray.cli import main

    argv = ["kit", "--out", small_kit] + [f"{k}={v}" for k, v in SMALL.items()]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert small_kit in out and "(cached)" in out
    assert "target" in out and "LlamaForCausalLM" in out and "Qwen2ForCausalLM" in out


def test_cached_path_imports_no_heavy_modules():
    code = (
        "import sys, sd2_ray.kit, sd2_ray.kit.cache, sd2_ray.kit.build; "
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'vllm', 'deepspeed') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256)
    out = llm.generate([sys.argv[2]], SamplingParams(temperature=0.0, max_tokens=24))
    print("VLLM_OUT " + json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_target_loads_in_vllm(kit_dir, tmp_path):
    """vLLM (CPU) serves the kit's target, and its greedy tokens equal transformers'."""
    import torch

    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import render_prompt

    target = os.path.join(kit_dir, "target")
    tok = load_tokenizer(target)
    prompt = render_prompt(read_jsonl(os.path.join(kit_dir, "prompts", "eval.jsonl"))[0], tok)
    script = tmp_path / "vllm_check.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), target, prompt], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_OUT ")]
    assert lines, proc.stderr[-3000:]
    vllm_ids = json.loads(lines[0][len("VLLM_OUT ") :])
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf = (
            load_model(target)
            .generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
            .tolist()
        )
    assert vllm_ids == hf


def test_kit_has_a_vision_language_target_and_its_scene_prompt_sets(small_kit):
    """kit:vlm is a LLaVA checkpoint over the text target (its LM weights start as the target's)
    with its processor; the scene rows carry their images as data URLs and the held-out scenes
    are not the training ones."""

    from sd2_ray.kit import kit_paths
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.vision.images import load_image
    from sd2_ray.vision.model import image_token_id, is_vlm_dir

    paths = kit_paths(small_kit)
    assert is_vlm_dir(paths["vlm"])
    assert os.path.isfile(os.path.join(paths["vlm"], "processor_config.json"))
    vlm, tok = load_model(paths["vlm"]), load_tokenizer(paths["vlm"])
    assert image_token_id(tok) == len(tok) - 1 == vlm.config.image_token_id
    assert vlm.lm_head.weight.data_ptr() == vlm.model.language_model.embed_tokens.weight.data_ptr()
    counts = {"vision_train_prompts": 8, "vision_eval_prompts": 4, "vision_captions": 4}
    rows = {name: read_jsonl(paths[name]) for name in counts}
    for name, count in counts.items():
        assert len(rows[name]) == count
        for row in rows[name]:
            assert row["image"].startswith("data:image/png;base64,")
            assert load_image(row["image"]).size == (32, 32)
            assert "<image>" in row["messages"][0]["content"] and row["response"]
    train_images = {r["image"] for r in rows["vision_train_prompts"]}
    assert not train_images & {r["image"] for r in rows["vision_eval_prompts"]}
    info = json.load(open(paths["kit_json"]))["models"]["vlm"]
    assert info["image_tokens"] == vlm.config.image_seq_length == 4
    assert 0.0 <= info["eval_exact_answers"] <= 1.0
