"""The kit's vision-language target: the kit's text target given eyes (a LLaVA model), trained on
procedural scenes in two short phases, as real VLMs are built:

1. the vision tower learns to see the scenes: a linear probe on each patch (one patch a grid
   cell) names the cell's shape and colour, or empty (a stand-in for a pretrained CLIP tower);
2. with the tower frozen, the projector and the LM learn to answer questions about scenes
   (LLaVA's visual instruction tuning), the loss on the answers only.

Also writes the vision prompt sets: ``vision-train.jsonl`` (questions to distill),
``vision-eval.jsonl`` (held-out scenes) and ``vision-captions.jsonl`` (image–caption pairs: the
MASSV projector's phase-1 data). Deterministic for a seed on a fixed thread count.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import torch

from sd2_ray.vision import data as VD
from sd2_ray.vision import images as I
from sd2_ray.vision import scenes

log = logging.getLogger(__name__)

PROBE_BATCH, PROBE_SCENES = 64, 4096
TRAIN_BATCH = 16
TOWER_LR, PROJECTOR_LR, LM_LR = 3e-3, 2e-3, 5e-4
PROMPT_FILES = ("vision-train.jsonl", "vision-eval.jsonl", "vision-captions.jsonl")


def cell_labels(scene: scenes.Scene) -> list[int]:
    """Per grid cell: 0 when empty, else 1 + the (shape, colour) index."""
    colours = list(scenes.COLOURS)
    labels = [0] * len(scenes.CELLS)
    for item in scene.items:
        labels[item.cell] = 1 + scenes.SHAPES.index(item.shape) * len(colours) + colours.index(item.colour)
    return labels


def pretrain_tower(vlm, steps: int, seed: int) -> float:
    """Train the vision tower with a per-patch linear probe; returns the probe's accuracy on
    fresh scenes."""
    from PIL import Image

    from sd2_ray.kit.training import lr_at

    rng = random.Random(f"{seed}-tower")
    torch.manual_seed(seed)
    drawn = [scenes.random_scene(rng) for _ in range(PROBE_SCENES)]
    processor = I.image_processor(vlm.config)
    pixels = I.pixel_values([Image.fromarray(scenes.draw(s)) for s in drawn], processor)
    labels = torch.tensor([cell_labels(s) for s in drawn])
    tower = vlm.model.vision_tower.train()
    classes = 1 + len(scenes.SHAPES) * len(scenes.COLOURS)
    probe = torch.nn.Linear(tower.config.hidden_size, classes)
    opt = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=TOWER_LR)
    split = PROBE_SCENES - 512  # the last 512 scenes measure the probe
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, TOWER_LR)
        pick = torch.randint(0, split, (PROBE_BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(
            probe(_patches(tower, pixels[pick])).flatten(0, 1), labels[pick].flatten()
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tower.eval()
    with torch.no_grad():
        predicted = probe(_patches(tower, pixels[split:])).argmax(-1)
    return float((predicted == labels[split:]).float().mean())


def _patches(tower, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


def train_vlm(vlm, tokenizer, rows: list[dict], steps: int, seed: int) -> list[float]:
    """Visual instruction tuning with the tower frozen; returns the per-step losses."""
    from tqdm.auto import tqdm

    from sd2_ray.kit.training import lr_at

    image_token, patches = int(vlm.config.image_token_id), int(vlm.config.image_seq_length)
    encoded = [VD.encode(tokenizer, r["messages"], r["response"], 1, image_token, patches, 512) for r in rows]
    pixels = I.pixel_values([I.load_image(r["image"]) for r in rows], I.image_processor(vlm.config))
    for p in vlm.model.vision_tower.parameters():
        p.requires_grad_(False)
    trained = [list(vlm.model.multi_modal_projector.parameters()), list(vlm.model.language_model.parameters())]
    peaks = [PROJECTOR_LR, LM_LR]
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in zip(trained, peaks, strict=True)], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vlm.train()
    losses = []
    for step in tqdm(range(steps), desc="kit: train vlm", unit="step", leave=False):
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = lr_at(step, steps, peak)
        pick = torch.randint(0, len(rows), (TRAIN_BATCH,), generator=gen).tolist()
        batch = VD.collate([encoded[i] for i in pick], tokenizer.pad_token_id, [pixels[i] for i in pick])
        loss = vlm(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for ps in trained for p in ps], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    vlm.eval()
    for p in vlm.model.vision_tower.parameters():
        p.requires_grad_(True)
    return losses


def exact_answers(vlm, tokenizer, rows: list[dict], max_new_tokens: int = 64) -> float:
    """Share of rows the VLM answers exactly as the scene's description says (greedy)."""
    from sd2_ray.specdec.types import GenerationRequest
    from sd2_ray.vision.prefill import VisionSpecEngine

    image_token, patches = int(vlm.config.image_token_id), int(vlm.config.image_seq_length)
    pixels = I.pixel_values([I.load_image(r["image"]) for r in rows], I.image_processor(vlm.config))
    requests = [
        GenerationRequest(VD.prompt_ids(tokenizer, r["messages"], 1, image_token, patches), max_new_tokens, images=(p,))
        for r, p in zip(rows, pixels, strict=True)
    ]
    results = VisionSpecEngine(vlm, None, 0, target_tokenizer=tokenizer).generate(requests)
    answers = [tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in results]
    return sum(a == r["response"] for a, r in zip(answers, rows, strict=True)) / max(len(rows), 1)


def prompt_sets(seed: int, train: int, evals: int, captions: int) -> dict[str, list[dict]]:
    """The three vision prompt files' rows (ids ``vision-<split>-<n>``)."""

    def rows(examples: list[dict], split: str) -> list[dict]:
        out = []
        for i, e in enumerate(examples):
            row = {"id": f"vision-{split}-{i}", "category": e["category"], "messages": e["messages"]}
            out.append({**row, "response": e["response"], "image": e["image"]})
        return out

    return {
        "vision-train.jsonl": rows(scenes.examples(train, seed, "train"), "train"),
        "vision-eval.jsonl": rows(scenes.examples(evals, seed, "eval"), "eval"),
        "vision-captions.jsonl": scenes.caption_rows(captions, seed),
    }


def build(target, tokenizer, out: str, *, seed: int, tower_steps: int, steps: int, prompts: dict[str, int]) -> dict:
    """Build the VLM from the trained text ``target`` into ``out``/vlm and the prompt sets into
    ``out``/prompts; returns the VLM's figures for kit.json."""
    import copy

    from sd2_ray.vision.model import build_vlm, save_vlm, vision_tokenizer

    started = time.time()
    tok = vision_tokenizer(tokenizer)
    vlm = build_vlm(copy.deepcopy(target), tok, seed=seed * 1000 + 7)
    probe_accuracy = pretrain_tower(vlm, tower_steps, seed * 1000 + 107)
    sets = prompt_sets(seed, prompts["train"], prompts["eval"], prompts["captions"])
    losses = train_vlm(vlm, tok, sets["vision-train.jsonl"], steps, seed * 1000 + 207)
    save_vlm(vlm, tok, os.path.join(out, "vlm"))
    for name, rows in sets.items():
        path = os.path.join(out, "prompts", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    figures = {
        "architecture": type(vlm).__name__,
        "params": sum(p.numel() for p in vlm.parameters()),
        "vocab_size": len(tok),
        "vision_params": sum(p.numel() for p in vlm.model.vision_tower.parameters()),
        "image_tokens": int(vlm.config.image_seq_length),
        "tower_probe_accuracy": round(probe_accuracy, 4),
        "steps": steps,
        "final_train_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "eval_exact_answers": round(exact_answers(vlm, tok, sets["vision-eval.jsonl"]), 4),
        "train_seconds": round(time.time() - started, 1),
        "prompts": {name: len(rows) for name, rows in sets.items()},
    }
    log.info("kit vlm: %s", figures)
    return figures
