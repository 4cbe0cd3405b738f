"""Benchmark of the embedded model kit: is it trained, and does the drafter leave room?

Builds (or reuses) the default kit and measures, in the same run, an untrained baseline of the
same shapes: held-out loss of the target vs. random init (and ln(vocab)), and greedy MAL at K=4
of the kit's drafter vs. a random drafter. Prints a table (kit vs. baseline vs. goal) and writes
bench/bench_kit.json.

    python bench/bench_kit.py [--prompts 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    from sd2_ray.kit import ensure_kit, kit_paths, shapes, training
    from sd2_ray.kit.config import KitConfig
    from sd2_ray.kit.corpus import load_corpus
    from sd2_ray.kit.measure import greedy_mal
    from sd2_ray.kit.tokenizer import render_chat, token_stream
    from sd2_ray.models.io import load_model, load_tokenizer

    torch.set_num_threads(1)
    started = time.time()
    kit = ensure_kit()
    ensure_seconds = time.time() - started
    info = json.load(open(kit_paths(kit)["kit_json"]))
    config = KitConfig.load(os.path.join(kit, "config.yaml"))
    tok = load_tokenizer(kit_paths(kit)["target"])
    target, drafter = load_model(kit_paths(kit)["target"]), load_model(kit_paths(kit)["drafter"])
    random_target = training.build_model(shapes.TARGET, tok, seed=12345).eval()
    random_drafter = training.build_model(config.drafter_shape(), tok, seed=12345).eval()

    corpus = load_corpus(config.corpus_chars, config.heldout_fraction, config.seed)
    heldout = token_stream(tok, corpus.heldout_texts())
    loss = training.heldout_loss(target, heldout, config.seq_len, 16)
    loss_random = training.heldout_loss(random_target, heldout, config.seq_len, 16)

    rows = [json.loads(line) for line in open(kit_paths(kit)["eval_prompts"])][: args.prompts]
    prompts = [tok(render_chat(tok, r["messages"][0]["content"]), add_special_tokens=False)["input_ids"] for r in rows]
    mal = greedy_mal(target, drafter, prompts, 4, args.new_tokens, tok.eos_token_id)["mean_accepted_length"]
    mal_random = greedy_mal(target, random_drafter, prompts, 4, args.new_tokens, tok.eos_token_id)[
        "mean_accepted_length"
    ]

    ln_vocab = math.log(len(tok))
    table = [
        ("target held-out loss (nats)", loss, loss_random, "< 4.75 (test bound)", loss < 4.75),
        ("drafter greedy MAL, K=4", mal, mal_random, "1.2 .. 2.5", 1.2 <= mal <= 2.5),
        # the target and the drafters train side by side, one core each: wall is about CPU / 2
        ("build wall seconds (kit.json)", info["build_seconds"], None, "<= 480 (idle)", info["build_seconds"] <= 480),
        (
            "build CPU seconds (kit.json)",
            info.get("build_cpu_seconds", float("nan")),
            None,
            "<= 960 (2 x 480)",
            info.get("build_cpu_seconds", 0) <= 960,
        ),
        ("cached ensure_kit() seconds", ensure_seconds, None, "< 1", ensure_seconds < 1),
    ]
    print(f"kit {kit}  (ln V = {ln_vocab:.3f}, {args.prompts} eval prompts x {args.new_tokens} tokens)")
    print(f"{'metric':<30} {'kit':>10} {'baseline':>10} {'goal':>18}  met")
    for name, value, base, goal, met in table:
        base_s = f"{base:10.3f}" if base is not None else f"{'-':>10}"
        print(f"{name:<30} {value:10.3f} {base_s} {goal:>18}  {'yes' if met else 'NO'}")
    print("baseline = same shapes, random init (untrained)")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_kit.json")
    with open(out, "w") as f:
        json.dump(
            {
                "kit": kit,
                "rows": [dict(zip(("metric", "kit", "baseline", "goal", "met"), r, strict=True)) for r in table],
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
