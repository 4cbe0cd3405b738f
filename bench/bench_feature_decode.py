"""Benchmark: feature-head chain decoding without and with KV caches, in one run.

Same target, same head, same prompts, greedy; per batch size it prints tokens/s of

- ``recompute``: the target over each row's whole sequence every pass, the head over its whole
  feature sequence every draft step (``FeatureSpecDecoder(kv_cache=False)``);
- ``cached``: the target's and the head's KV caches (the default);
- ``target-only``: the cached target alone (``speculate=False``), the speedup's baseline;
- ``tree``: EAGLE-2 tree drafting (``TreeSpecDecoder``, decoded per row: the same at any batch);

with MAL, and checks that both decoders emit the same tokens. The head is trained here for a few
dozen steps on the target's own greedy continuations of training prompts (no saved heads exist
yet), so MAL is what a briefly trained head reaches, not a result about EAGLE or FSPAD.

    python bench/bench_feature_decode.py [--kit DIR] [--prompts 8] [--max-new-tokens 64] [-k 4]
        [--train-steps 60] [--batches 1,8] [--tree 4,4,16] [--threads 1]

Without ``--kit``: a random Llama of the model kit's size (hidden 256, 4 layers, vocabulary 2048)
and random prompts; with it: the kit's target, its training prompts for the head and its eval
prompts for decoding (rendered with the target's chat template).
"""

from __future__ import annotations

import argparse
import time

import torch


def load(args):
    """(target, training prompts, eval prompts, description)."""
    if args.kit is None:
        from sd2_ray.testing.tiny import tiny_model

        target = tiny_model(
            "llama", seed=0, vocab_size=2048, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768
        )
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 2048, (8 + 4 * (i % 5),), generator=g).tolist() for i in range(2 * args.prompts)]
        return target, prompts[: args.prompts], prompts[args.prompts :], "random llama (hidden 256 x 4 layers)"
    from sd2_ray.evaluate.core import prepare_prompts
    from sd2_ray.kit import kit_paths
    from sd2_ray.models.io import load_model, load_tokenizer
    from sd2_ray.rows import read_rows

    paths = kit_paths(args.kit)
    tok = load_tokenizer(paths["target"])
    train = prepare_prompts(read_rows(paths["train_prompts"], limit=4 * args.prompts), tok)
    evals = prepare_prompts(read_rows(paths["eval_prompts"], limit=args.prompts), tok)
    return load_model(paths["target"]), train, evals, f"model kit target ({args.kit})"


def greedy_continuations(target, prompts: list[list[int]], n: int) -> list[list[int]]:
    from sd2_ray.feature.config import FeatureHeadConfig
    from sd2_ray.feature.decode import FeatureSpecDecoder
    from sd2_ray.feature.head import FeatureHead
    from sd2_ray.specdec.types import GenerationRequest

    head = FeatureHead(FeatureHeadConfig.for_target(target.config), target)  # unused: target-only
    results = FeatureSpecDecoder(target, head, 0).generate([GenerationRequest(p, n) for p in prompts], speculate=False)
    return [p + r.token_ids for p, r in zip(prompts, results, strict=True)]


def trained_head(target, seqs: list[list[int]], steps: int, variant: str):
    from sd2_ray.feature.config import FeatureHeadConfig
    from sd2_ray.feature.head import FeatureHead
    from sd2_ray.testing.feature_heads import train_head

    torch.manual_seed(1)
    head = FeatureHead(FeatureHeadConfig.for_target(target.config, variant), target)
    losses = train_head(head, target, seqs, steps, lr=3e-3)
    return head.eval(), losses[-1]


def run(decoder, prompts: list[list[int]], n: int, batch: int, speculate: bool = True):
    from sd2_ray.feature.decode import total_stats
    from sd2_ray.specdec.types import GenerationRequest

    outputs, results, seconds, cpu = [], [], 0.0, 0.0
    for start in range(0, len(prompts), batch):
        requests = [GenerationRequest(p, n) for p in prompts[start : start + batch]]
        began, cpu_began = time.perf_counter(), time.process_time()
        chunk = decoder.generate(requests, speculate=speculate)
        seconds += time.perf_counter() - began
        cpu += time.process_time() - cpu_began
        results += chunk
        outputs += [r.token_ids for r in chunk]
    tokens = sum(len(o) for o in outputs)
    mal = total_stats(results).mean_accepted_length
    return {"outputs": outputs, "tps": tokens / seconds, "cpu_tps": tokens / cpu, "mal": mal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kit", default=None, help="a built model kit directory (default: a random target)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--variant", default="eagle")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tree", default="4,4,16", help="depth,top_k,total_tokens of the tree ('' = no tree)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sd2_ray.feature.decode import FeatureSpecDecoder
    from sd2_ray.feature.tree import TreeSpecDecoder

    target, train_prompts, eval_prompts, what = load(args)
    began = time.perf_counter()
    head, loss = trained_head(
        target, greedy_continuations(target, train_prompts, args.max_new_tokens), args.train_steps, args.variant
    )
    seconds = time.perf_counter() - began
    print(f"{what}; head ({args.variant}) trained {args.train_steps} steps in {seconds:.1f}s, loss {loss:.3f}")
    print(f"{len(eval_prompts)} prompts, {args.max_new_tokens} new tokens, K = {args.k}, {args.threads} thread(s)")
    print("tokens/s: wall; per CPU-second of this process (1 thread: steadier on a shared machine)")
    print(
        f"{'batch':>5} {'path':>12} {'tokens/s':>9} {'cpu tok/s':>9} {'MAL':>6} {'vs recompute':>13} {'vs target':>10}"
    )
    with torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            cached = FeatureSpecDecoder(target, head, args.k)
            paths = {
                "recompute": run(
                    FeatureSpecDecoder(target, head, args.k, kv_cache=False), eval_prompts, args.max_new_tokens, batch
                ),
                "cached": run(cached, eval_prompts, args.max_new_tokens, batch),
                "target-only": run(cached, eval_prompts, args.max_new_tokens, batch, speculate=False),
            }
            if args.tree:
                tree = TreeSpecDecoder(target, head, *(int(x) for x in args.tree.split(",")))
                paths["tree"] = run(tree, eval_prompts, args.max_new_tokens, batch)
                assert paths["tree"]["outputs"] == paths["cached"]["outputs"], "tree decoding differs"
            outputs = paths["target-only"]["outputs"]
            assert paths["cached"]["outputs"] == paths["recompute"]["outputs"] == outputs, "decoders differ"
            for name, r in paths.items():  # ratios of CPU tokens/s
                ratio = r["cpu_tps"] / paths["recompute"]["cpu_tps"]
                base = r["cpu_tps"] / paths["target-only"]["cpu_tps"]
                row = f"{batch:>5} {name:>12} {r['tps']:>9.1f} {r['cpu_tps']:>9.1f} {r['mal']:>6.2f}"
                print(f"{row} {ratio:>12.2f}x {base:>9.2f}x")


if __name__ == "__main__":
    main()
