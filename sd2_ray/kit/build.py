"""``sd2 kit``: build the embedded model kit, top to bottom (corpus, tokenizers, prompts,
target, drafters, figures), into a directory that becomes visible only when complete.

:func:`ensure` (what ``ensure_kit()`` calls) lives here, above :mod:`sd2_ray.kit.cache`: it asks
the cache whether the kit is current and builds it when not. Module-level imports stay light
(torch is imported inside the build), so a cached kit is still returned in milliseconds."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import tempfile
import time

from sd2_ray import manifest, storage
from sd2_ray.errors import ConfigError
from sd2_ray.kit.cache import KIT_JSON, KIT_VERSION, STAGE, build_lock, content_hash, is_current, kit_location
from sd2_ray.kit.config import KitConfig

log = logging.getLogger(__name__)

MAL_K, MAL_PROMPTS, MAL_NEW_TOKENS = 4, 16, 32
CHAT_EXAMPLES_PER_TASK = 1200  # cap: the generated arithmetic would otherwise outnumber the rest


def main(config: KitConfig) -> str:
    """CLI entry: build (or reuse) the kit and print where it is and its figures."""
    kit_dir, built = ensure_with_status(config)
    with open(os.path.join(kit_dir, KIT_JSON)) as f:
        info = json.load(f)
    print(f"kit: {kit_dir}" + ("" if built else "  (cached)"))
    print(summary(info))
    return kit_dir


def ensure(config: KitConfig) -> str:
    """The kit directory for ``config``: returned at once when current, else built (into a temp
    dir renamed into place, so a half-built kit is never visible)."""
    return ensure_with_status(config)[0]


def ensure_with_status(config: KitConfig) -> tuple[str, bool]:
    """(kit directory, whether this call built it)."""
    digest = content_hash(config)
    kit_dir = kit_location(config, digest)
    if not config.overwrite and is_current(kit_dir, digest):
        return kit_dir, False
    with build_lock(kit_dir):
        if not config.overwrite and is_current(kit_dir, digest):
            return kit_dir, False  # another process finished it while we waited
        tmp = tempfile.mkdtemp(prefix=".kit-building-", dir=os.path.dirname(kit_dir))
        try:
            build_kit(config, tmp, digest)
            storage.replace_dir(tmp, kit_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return kit_dir, True


def summary(info: dict) -> str:
    lines = [f"{'model':<12} {'arch':<24} {'params':>10} {'vocab':>6} {'held-out loss':>14} {'ln(vocab)':>9}"]
    for name, m in info["models"].items():
        if name == "vlm":
            lines.append(
                f"{name:<12} {m['architecture']:<24} {m['params']:>10,} {m['vocab_size']:>6} "
                f"tower probe {m['tower_probe_accuracy']:.3f}, exact answers on held-out scenes "
                f"{m['eval_exact_answers']:.3f}"
            )
            continue
        lines.append(
            f"{name:<12} {m['architecture']:<24} {m['params']:>10,} {m['vocab_size']:>6} "
            f"{m['heldout_loss']:>14.3f} {m['ln_vocab']:>9.3f}"
        )
    mal = info.get("drafter_greedy_mal")
    if mal:
        lines.append(
            f"drafter greedy MAL at K={mal['num_speculative_tokens']}: "
            f"{mal['mean_accepted_length']:.3f} ({mal['prompts']} eval prompts)"
        )
    lines.append(
        f"prompts: {info['prompts']['train']} train, {info['prompts']['eval']} eval; "
        f"build {info['build_seconds']:.0f} s wall, {info.get('build_cpu_seconds', 0):.0f} s CPU "
        f"(load {info.get('load_average_at_start', 0)}); content hash {info['content_hash']}"
    )
    return "\n".join(lines)


def build_kit(config: KitConfig, out: str, digest: str) -> dict:
    """Build every part of the kit into ``out`` (a fresh local dir) and return kit.json's data."""
    import torch

    started, started_cpu, load = time.time(), time.process_time(), os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)  # fixed: same weights for a seed, and no spin under load
    try:
        config.save(out)
        manifest.start(out, STAGE, content_hash=digest)
        info = _build(config, out, digest, started)
        # CPU seconds next to wall seconds: on a shared machine the wall time mostly measures the load
        info.update(
            build_cpu_seconds=round(time.process_time() - started_cpu + info["child_cpu_seconds"], 1),
            load_average_at_start=round(load, 1),
        )
        with open(os.path.join(out, KIT_JSON), "w") as f:
            json.dump(info, f, indent=2)
        manifest.complete(out, STAGE, content_hash=digest, models=list(info["models"]), prompts=info["prompts"])
        return info
    finally:
        torch.set_num_threads(threads)


def _build(config: KitConfig, out: str, digest: str, started: float) -> dict:
    from sd2_ray.kit import shapes, training
    from sd2_ray.kit.corpus import load_corpus
    from sd2_ray.kit.parts import Job, train_all
    from sd2_ray.kit.tokenizer import render_chat, token_stream, train_tokenizer

    random.seed(config.seed)
    corpus = load_corpus(config.corpus_chars, config.heldout_fraction, config.seed)
    log.info("kit corpus: %s", corpus.stats())
    examples = _task_examples(config, corpus)
    # the tokenizers learn the tasks' words too (Pig Latin, arithmetic), as pretraining text
    texts = corpus.train_texts() + [_plain(e) for e in examples["train"]]
    tok = train_tokenizer(texts, config.vocab_size)
    uag_tok = train_tokenizer(texts, config.uag_vocab_size)

    train_rows, eval_rows, chat_examples = _prompt_sets(config, examples, tok)
    _write_rows(os.path.join(out, "prompts", "train.jsonl"), train_rows)
    _write_rows(os.path.join(out, "prompts", "eval.jsonl"), eval_rows)

    corpus_stream = token_stream(tok, corpus.train_texts())
    chat_stream = token_stream(tok, [render_chat(tok, e["messages"], e["response"]) for e in chat_examples])
    heldout_stream = token_stream(tok, corpus.heldout_texts())
    uag_stream = token_stream(uag_tok, corpus.train_texts())
    uag_heldout = token_stream(uag_tok, corpus.heldout_texts())
    eval_chat_stream = token_stream(tok, [render_chat(tok, r["messages"], r["response"]) for r in eval_rows])

    jobs = [
        Job(0, "target", shapes.TARGET, tok, *_mix(corpus_stream, chat_stream, config.chat_share), config.target_steps),
        Job(
            1,
            "drafter",
            config.drafter_shape(),
            tok,
            *_mix(corpus_stream, chat_stream, config.drafter_chat_share),
            config.drafter_steps,
        ),
        Job(2, "drafter-uag", shapes.UAG_DRAFTER, uag_tok, [uag_stream], [1.0], config.uag_steps),
    ]
    heldout = {"target": heldout_stream, "drafter": heldout_stream, "drafter-uag": uag_heldout}
    trained_models, child_cpu = train_all(config, jobs)
    models, figures = {}, {}
    for job in jobs:
        model, trained = trained_models[job.name]
        model.save_pretrained(os.path.join(out, job.name), safe_serialization=True)
        job.tokenizer.save_pretrained(os.path.join(out, job.name))
        models[job.name] = model
        figures[job.name] = {
            "architecture": type(model).__name__,
            "params": training.num_params(model),
            "vocab_size": len(job.tokenizer),
            "ln_vocab": math.log(len(job.tokenizer)),
            "shape": job.shape.__dict__,
            **trained,
            "heldout_loss": training.heldout_loss(model, heldout[job.name], config.seq_len, config.heldout_windows),
        }
        log.info("kit %s: %s", job.name, figures[job.name])
    for name in ("target", "drafter"):  # the tasks, answered as the references do, on held-out rows
        figures[name]["eval_chat_loss"] = training.heldout_loss(
            models[name], eval_chat_stream, min(config.seq_len, len(eval_chat_stream) - 1), config.heldout_windows
        )
        figures[name]["eval_response_loss_by_task"] = {
            task: training.response_loss(models[name], tok, [r for r in eval_rows if r["category"] == task])
            for task in config.tasks
        }

    info = {
        "kit_version": KIT_VERSION,
        "content_hash": digest,
        "seed": config.seed,
        "seeds": {
            "init": {n: config.seed * 1000 + i for i, n in enumerate(models)},
            "data": {n: config.seed * 1000 + 100 + i for i, n in enumerate(models)},
        },
        "models": figures,
        "corpus": {
            **corpus.stats(),
            "train_tokens": len(corpus_stream),
            "chat_tokens": len(chat_stream),
            "heldout_tokens": len(heldout_stream),
        },
        "prompts": {
            "train": len(train_rows),
            "eval": len(eval_rows),
            "chat_examples": len(chat_examples),
            "by_task": _count_by_task(config.tasks, train_rows, eval_rows, chat_examples),
        },
        "python": platform.python_version(),
        "torch_threads": config.num_threads,
        "child_cpu_seconds": round(child_cpu, 1),
    }
    if config.measure_mal:
        info["drafter_greedy_mal"] = _measure_mal(models["target"], models["drafter"], tok, eval_rows)
    if config.vision:
        figures["vlm"] = _vision_part(config, out, models["target"], tok)
    info["build_seconds"] = round(time.time() - started, 1)
    return info


def _vision_part(config: KitConfig, out: str, target, tok) -> dict:
    """The VLM and its scene prompts, built (minutes) or copied from the per-part cache."""
    from sd2_ray.kit.cache import part_location
    from sd2_ray.vision import kit_vlm

    part = part_location(config, "vlm")
    record = os.path.join(part, "vlm.json")
    if not (config.reuse_trained and os.path.isfile(record)):
        os.makedirs(os.path.dirname(part), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".part-", dir=os.path.dirname(part))
        try:
            prompts = {
                "train": config.vision_train_prompts,
                "eval": config.vision_eval_prompts,
                "captions": config.vision_captions,
            }
            figures = kit_vlm.build(
                target,
                tok,
                tmp,
                seed=config.seed,
                tower_steps=config.vision_tower_steps,
                steps=config.vision_steps,
                prompts=prompts,
            )
            with open(os.path.join(tmp, "vlm.json"), "w") as f:
                json.dump(figures, f)
            if not os.path.isdir(part):
                os.replace(tmp, part)  # whole or absent: vlm.json is inside
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(part, "vlm"), os.path.join(out, "vlm"))
    for name in kit_vlm.PROMPT_FILES:
        shutil.copy(os.path.join(part, "prompts", name), os.path.join(out, "prompts", name))
    with open(record) as f:
        figures = json.load(f)
    return figures


def _mix(corpus_stream: list[int], chat_stream: list[int], chat_share: float) -> tuple[list, list]:
    """(streams, shares) of a model's training windows; no chat stream at share 0 (the sampler's
    draws, hence the weights, are then those of a corpus-only model)."""
    if not chat_share:
        return [corpus_stream], [1.0]
    return [corpus_stream, chat_stream], [1 - chat_share, chat_share]


def _task_examples(config: KitConfig, corpus) -> dict[str, list[dict]]:
    """Every task's examples per split: ``train`` from the train files, ``heldout`` from the
    held-out files (arithmetic: by a seeded hash of the expression)."""
    from sd2_ray.kit.prompts import function_docs
    from sd2_ray.kit.tasks import task_examples

    docs = {
        "train": function_docs({f: corpus.texts[f] for f in corpus.train_files}),
        "heldout": function_docs({f: corpus.texts[f] for f in corpus.heldout_files}),
    }
    return {
        split: [e for task in config.tasks for e in task_examples(task, docs[split], split, config.seed)]
        for split in docs
    }


def _plain(example: dict) -> str:
    return "\n".join([m["content"] for m in example["messages"]] + [example["response"]])


def _prompt_sets(config: KitConfig, examples: dict[str, list[dict]], tok) -> tuple[list[dict], list[dict], list[dict]]:
    """Train rows and chat examples from the train split, eval rows from the held-out split, each
    round-robin over the tasks; only conversations that fit one training window."""
    from sd2_ray.kit import prompts as P
    from sd2_ray.kit.tokenizer import render_chat

    def fits(example: dict) -> bool:
        text = render_chat(tok, example["messages"], example["response"])
        return len(tok(text, add_special_tokens=False)["input_ids"]) <= config.seq_len - 8

    per_task_train = math.ceil(config.train_prompts / len(config.tasks))
    per_task_eval = math.ceil(config.eval_prompts / len(config.tasks))
    chat, evals = [], []
    for task in config.tasks:
        of_task = {split: [e for e in examples[split] if e["category"] == task] for split in examples}
        chosen = P.select(of_task["train"], None, config.seed, fits)[: max(CHAT_EXAMPLES_PER_TASK, per_task_train)]
        held = P.select(of_task["heldout"], per_task_eval, config.seed, fits)
        if not chosen or not held:
            side = "train" if not chosen else "held-out"
            raise ConfigError(
                f"tasks: task '{task}' gives no {side} example that fits seq_len={config.seq_len} "
                f"(corpus_chars={config.corpus_chars} may be too small)"
            )
        chat.append(chosen)
        evals.append(held)
    train_rows = [P.make_row("train", i, e) for i, e in enumerate(P.interleave([c[:per_task_train] for c in chat]))]
    eval_rows = [P.make_row("eval", i, e) for i, e in enumerate(P.interleave(evals))]
    return train_rows[: config.train_prompts], eval_rows[: config.eval_prompts], P.interleave(chat)


def _count_by_task(tasks: list[str], train_rows: list[dict], eval_rows: list[dict], chat: list[dict]) -> dict:
    def count(rows: list[dict], task: str) -> int:
        return sum(1 for r in rows if r["category"] == task)

    return {
        t: {"train": count(train_rows, t), "eval": count(eval_rows, t), "chat_examples": count(chat, t)} for t in tasks
    }


def _write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _measure_mal(target, drafter, tok, eval_rows: list[dict]) -> dict:
    from sd2_ray.kit.measure import greedy_mal
    from sd2_ray.kit.tokenizer import render_chat

    prompts = [
        tok(render_chat(tok, r["messages"]), add_special_tokens=False)["input_ids"] for r in eval_rows[:MAL_PROMPTS]
    ]
    result = greedy_mal(target, drafter, prompts, k=MAL_K, max_new_tokens=MAL_NEW_TOKENS, eos_id=tok.eos_token_id)
    return {**result, "prompts": len(prompts), "max_new_tokens": MAL_NEW_TOKENS}
