"""Fine-tuning on a real local Ray cluster with DeepSpeed ZeRO-2/3 on 2 CPU workers:
sparsity kept, loss down, 1-vs-2-worker parity, recovery from a killed worker, rerun after
a failed driver run, and checkpoints + model on a loopback S3 server. (A lost training node:
tests/test_cluster_nodes.py, slow.)"""

from __future__ import annotations

import os

import pytest
import torch

from sd2_ray import manifest, storage
from sd2_ray.finetune.config import FinetuneConfig
from sd2_ray.finetune.job import run_finetune
from sd2_ray.models.io import load_model
from sd2_ray.models.sparsity import load_masks, masked_weights_nonzero
from sd2_ray.testing.toy import make_sparse_drafter, write_toy_dataset

pytestmark = pytest.mark.ray

STEPS = 6
LONG_STEPS = 24  # 3 epochs of the toy data: runs that lose a worker midway, long enough for the kill to land
COMMON = dict(
    max_steps=STEPS,
    lr=3e-3,
    batch_size=8,
    seq_len=64,
    checkpoint_every=2,
    warmup_steps=1,
    # partition even the tiny model's weights, so ZeRO-3 really gathers
    deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    """One local Ray for the module. Its processes get the loopback S3 settings that the
    ``s3_bucket`` fixture sets later (Ray Data read tasks take their env from the cluster)."""
    import ray

    from sd2_ray.finetune.extensions import extensions_dir

    env = {
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": extensions_dir(),
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # 2 training workers + room for Ray Data's read tasks (logical CPUs; the box has 2 cores);
    # ensure_ray passes the environment to every worker and retries a start on a busy machine
    from sd2_ray.runtime import ensure_ray

    ensure_ray(num_cpus=4, attempts=3)
    yield
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = make_sparse_drafter(str(root / "pruned"), 0.5)
    data = write_toy_dataset(str(root / "data"), 64)
    return {"root": root, "model": model, "data": data}


def finetune(inputs, name: str, **kwargs) -> FinetuneConfig:
    """A config for the shared toy inputs, output under <root>/<name>/drafter."""
    return FinetuneConfig(
        model=kwargs.pop("model", inputs["model"]),
        data=kwargs.pop("data", inputs["data"]),
        output=kwargs.pop("output", str(inputs["root"] / name / "drafter")),
        **{**COMMON, **kwargs},
    )


@pytest.fixture(scope="module")
def zero2_run(inputs):
    cfg = finetune(inputs, "zero2", workers=2, zero_stage=2)
    return run_finetune(cfg)


def assert_sparse_and_learned(result, input_model: str, steps: int = STEPS):
    out = storage.local_dir(result.output)
    masks = load_masks(out)
    assert masks and masks.keys() == load_masks(input_model).keys()
    tuned, original = load_model(out), load_model(input_model)
    assert masked_weights_nonzero(tuned, masks) == 0
    before = dict(original.named_parameters())
    for key, param in tuned.named_parameters():
        if key in masks:
            kept = masks[key]
            assert (param.detach()[~kept] == 0).all()
            assert (param.detach()[kept] != before[key].detach()[kept]).float().mean() > 0.9, key
    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    assert losses[-1] < losses[0] - 0.1
    assert result.summary["sparsity_check"]["verified"] is True
    assert manifest.is_complete(result.output)
    for name in ("config.yaml", "metrics.json", "sparsity.json", "masks/masks.safetensors", "tokenizer.json"):
        assert storage.exists(storage.join(result.output, name)), name


def test_zero2_two_workers_keeps_sparsity_and_learns(zero2_run, inputs):
    assert_sparse_and_learned(zero2_run, inputs["model"])
    checked = [h for h in zero2_run.history if "masked_nonzero" in h]
    assert checked and all(h["masked_nonzero"] == 0 for h in checked)
    assert all(h["tokens_per_s"] > 0 and h["lr"] > 0 for h in zero2_run.history)
    # every artifact lived under the output; the published drafter no longer needs its checkpoints
    assert not storage.exists(str(inputs["root"] / "zero2" / "drafter" / "_checkpoints"))
    assert not os.path.exists(inputs["root"] / "zero2" / "checkpoints")


def test_one_worker_matches_two_workers(zero2_run, inputs):
    one = run_finetune(finetune(inputs, "one", workers=1, zero_stage=2))
    two = [h["loss"] for h in zero2_run.history]
    assert [h["tokens"] for h in one.history] == [h["tokens"] for h in zero2_run.history]  # same batches
    torch.testing.assert_close(torch.tensor([h["loss"] for h in one.history]), torch.tensor(two), rtol=1e-3, atol=1e-4)


def kill_a_worker_after_a_checkpoint(cfg: FinetuneConfig, timeout_s: float = 300.0) -> int:
    """SIGKILL one of this run's Ray Train workers (as a lost node would) once Ray Train has
    registered a checkpoint (its snapshot lists one); returns the newest step registered then."""
    import re
    import signal
    import time

    from _ray_procs import our_raylet_pid, ray_worker_pids

    raylet = our_raylet_pid()
    snapshot = storage.join(cfg.checkpoint_run_dir(), "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = re.findall(r"step-(\d{7})", storage.read_text(snapshot)) if storage.exists(snapshot) else []
        workers = ray_worker_pids("RayTrainWorker", raylet)
        if steps and workers:
            os.kill(workers[-1], signal.SIGKILL)
            return max(int(step) for step in steps)
        time.sleep(0.2)
    raise AssertionError("no checkpoint was registered")


def run_with_a_killed_worker(cfg: FinetuneConfig):
    """(the run's result or exception, checkpoint step at the kill): training in a thread, the
    kill from here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_finetune, cfg)
        step = kill_a_worker_after_a_checkpoint(cfg)
        try:
            return future.result(), step
        except Exception as err:  # noqa: BLE001 - the caller decides what it expected
            return err, step


@pytest.mark.slow  # the default suite's autoscaling run loses its training node mid-fine-tune
def test_killed_worker_resumes_from_its_checkpoint(zero2_run, inputs):
    cfg = finetune(inputs, "failing", workers=2, zero_stage=2, max_steps=LONG_STEPS, epochs=3, checkpoint_every=4)
    result, killed_at = run_with_a_killed_worker(cfg)
    assert not isinstance(result, Exception), result
    assert result.summary["restarts"] >= 1
    history = [(h["step"], h["restarts"]) for h in result.history]
    resumed = [step for step, restarts in history if restarts >= 1]
    assert [step for step, _ in history] == list(range(1, LONG_STEPS + 1))  # every step once, in order
    assert resumed and resumed[0] - 1 >= killed_at and (resumed[0] - 1) % 4 == 0  # from a checkpoint
    assert_sparse_and_learned(result, inputs["model"], steps=LONG_STEPS)


def test_zero3_on_s3_keeps_sparsity_and_learns(inputs, s3_bucket):
    """Also scores 9 held-out top-k rows every 3 steps: under ZeRO-3 a forward is a collective,
    so the rank whose share runs out first (5 + 4 rows in micro-batches of 4) runs an uncounted
    row; every held-out row is counted once."""
    from sd2_ray.testing.tokenizer import toy_tokenizer
    from sd2_ray.testing.toy import toy_rows, with_toy_topk

    base = f"s3://{s3_bucket}/run"
    storage.copy_dir(inputs["model"], f"{base}/pruned")
    write_rows(f"{base}/distilled", with_toy_topk(toy_rows(57), toy_tokenizer()))
    cfg = finetune(
        inputs,
        "zero3",
        workers=2,
        zero_stage=3,
        model=f"{base}/pruned",
        data=f"{base}/distilled",
        output=f"{base}/drafter",
        stream_data=True,
        storage_path=f"{base}/checkpoints",  # a chosen place: kept after publishing
        eval_every=3,
        eval_rows=9,
    )
    result = run_finetune(cfg)
    assert_sparse_and_learned(result, inputs["model"])
    evals = [h for h in result.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6] and all(h["eval_rows"] == 9 for h in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    keys = storage.list_files(f"{base}/checkpoints/drafter", recursive=True)
    # keep_checkpoints 2 with a selection: the two best-scored stay (step 3, forced by its better
    # held-out loss, and the final one); the periodic steps 2 and 4 made way
    assert any("/step-0000003/" in k and "zero_pp_rank_1" in k for k in keys)  # both ranks' shards
    assert not any("/step-0000002/" in k or "/step-0000004/" in k for k in keys)
    assert any(k.endswith("/final/model/model.safetensors") for k in keys)
    assert storage.exists(f"{base}/drafter/model.safetensors")


@pytest.mark.slow
def test_kit_drafter_pruned_with_sparsegpt_learns_from_jsonl(kit_dir, tmp_path):
    """The realistic path: the kit's trained drafter, SparseGPT-pruned to 50 % by the prune
    stage, fine-tuned on the kit's JSONL prompt rows (their reference responses)."""
    from sd2_ray.prune.config import PruneConfig
    from sd2_ray.prune.job import run_prune

    prompts = os.path.join(kit_dir, "prompts", "train.jsonl")
    pruned = run_prune(
        PruneConfig(
            model=os.path.join(kit_dir, "drafter"),
            calibration=prompts,
            method="sparsegpt",
            sparsity=0.5,
            num_samples=32,
            seq_len=128,
            output=str(tmp_path / "pruned"),
        )
    )
    cfg = FinetuneConfig(
        model=pruned,
        data=prompts,
        output=str(tmp_path / "drafter"),
        workers=2,
        zero_stage=2,
        max_steps=12,
        lr=5e-4,
        batch_size=8,
        seq_len=128,
        checkpoint_every=6,
    )
    result = run_finetune(cfg)
    out = storage.local_dir(result.output)
    masks = load_masks(out)
    assert masks and masked_weights_nonzero(load_model(out), masks) == 0
    # learned: a lower loss on one fixed batch of the rows it trained on (the per-step losses are
    # of different batches, mixing six tasks whose losses differ several-fold: not comparable)
    tokenizer_dir = os.path.join(kit_dir, "drafter")
    before, after = (answer_loss(load_model(m), tokenizer_dir, prompts, 32) for m in (pruned, out))
    print(f"loss on the first 32 train rows: pruned {before:.3f}, fine-tuned {after:.3f}")
    assert after < before - 0.02  # measured 2.970 -> 2.908 after 12 steps at lr 5e-4


def answer_loss(model, tokenizer_dir: str, prompts: str, count: int) -> float:
    """The model's mean loss on the answers of the first ``count`` rows, as the fine-tune encodes them."""
    from sd2_ray.finetune.data import collate, encode_rows
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.rows import read_rows

    tokenizer = load_tokenizer(tokenizer_dir)
    batch = collate(encode_rows(read_rows(prompts, limit=count), tokenizer, 128), tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss.item()


def reference_losses(model_dir: str, data: str, steps: int, cfg: FinetuneConfig) -> list[float]:
    """The same objective in a plain torch loop (no Ray, no DeepSpeed): file-order batches, the
    loss module, masked gradients, AdamW, the cosine schedule and norm clipping."""
    from sd2_ray.finetune import data as D
    from sd2_ray.finetune import masking
    from sd2_ray.finetune.loss_module import CausalLMLoss
    from sd2_ray.finetune.losses import LossSpec
    from sd2_ray.finetune.optimizer import lr_factor, param_groups
    from sd2_ray.models.io import load_tokenizer
    from sd2_ray.rows import read_rows

    torch.manual_seed(cfg.seed)
    model = load_model(model_dir).train()
    tokenizer = load_tokenizer(model_dir)
    masks = masking.prepare_masks(model_dir, model)
    masking.register_gradient_masks(model, masks)
    loss_module = CausalLMLoss(model, LossSpec.from_config(cfg))
    optimizer = torch.optim.AdamW(param_groups(loss_module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, steps, cfg.scheduler, cfg.min_lr_ratio)
    )
    rows = read_rows(data)
    losses = []
    for step_index in range(steps):
        batch = D.collate(
            D.encode_rows(
                rows[step_index * cfg.batch_size : (step_index + 1) * cfg.batch_size], tokenizer, cfg.seq_len
            ),
            tokenizer.pad_token_id,
        )
        summed = loss_module(**batch)
        labelled = D.labelled_tokens(batch["labels"])
        optimizer.zero_grad()
        (summed / labelled).backward()
        torch.nn.utils.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(summed.item() / labelled)
    return losses


def test_golden_losses_match_a_plain_torch_loop(inputs):
    """Fixed seed, tiny model, 5 steps, 1 worker: the Ray Train + DeepSpeed ZeRO-2 run's losses
    equal an independent plain-torch loop's within 1e-4 (the 1-vs-2-worker parity is
    test_one_worker_matches_two_workers)."""
    cfg = finetune(inputs, "golden", workers=1, zero_stage=2, max_steps=5, shuffle_buffer=0, checkpoint_every=100)
    result = run_finetune(cfg)
    expected = reference_losses(inputs["model"], inputs["data"], 5, cfg)
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in result.history]), torch.tensor(expected), rtol=0, atol=1e-4
    )


# ---------------------------------------------------------------- distillation losses and held-out selection


def write_rows(path: str, rows: list[dict]) -> str:
    import pyarrow as pa

    storage.write_parquet(storage.join(path, "part-00000.parquet"), pa.Table.from_pylist(rows))
    return path


def heldout_acceptance(model_dir: str, rows: list[dict], k: int = 4) -> dict:
    """Teacher-forced acceptance of a saved drafter on rows, in this process (no engine)."""
    from sd2_ray.finetune import data as D
    from sd2_ray.finetune.acceptance import teacher_forced
    from sd2_ray.models.io import load_tokenizer

    tok = load_tokenizer(model_dir)
    batch = D.collate(D.encode_rows(rows, tok, 64, use_ids=True), tok.pad_token_id)
    return teacher_forced(load_model(model_dir), [batch], k)


def test_kd_loss_keeps_masks_learns_and_reports_heldout_acceptance(inputs):
    from sd2_ray.testing.tokenizer import toy_tokenizer
    from sd2_ray.testing.toy import toy_rows, with_toy_topk

    data = write_rows(str(inputs["root"] / "kd-data"), with_toy_topk(toy_rows(56, seed=3), toy_tokenizer()))
    cfg = finetune(
        inputs,
        "kd",
        data=data,
        workers=2,
        zero_stage=2,
        loss="fkl",
        ce_weight=0.5,
        eval_every=3,
        eval_rows=8,
        select_by="expected_mal",
    )
    result = run_finetune(cfg)
    assert_sparse_and_learned(result, inputs["model"])  # 48 training rows: 6 steps
    assert all(h["kd"] > 0 and h["kd_tokens"] > 0 and h["ce"] > 0 for h in result.history)
    evals = [h for h in result.history if "expected_mal" in h]
    assert [h["step"] for h in evals] == [3, 6]
    for h in evals:
        assert 1.0 <= h["expected_mal"] <= 5.0 and 0.0 <= h["alpha"] <= h["alpha_upper"] <= 1.0
        assert h["eval_rows"] == 8 and h["eval_loss"] > 0 and h["eval_kd"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the held-out rows were learned, not trained on
    metrics = storage.read_json(storage.join(result.output, "metrics.json"))
    best = max(evals, key=lambda h: (h["expected_mal"], h["step"]))  # ties: the later step
    assert metrics["selection"]["select_by"] == "expected_mal" and metrics["loss"] == "fkl"
    assert metrics["published_step"] == best["step"] == evals[-1]["best_step"]


def test_select_by_expected_mal_publishes_an_earlier_better_checkpoint(inputs):
    """Constructed so an early step is best: the held-out rows answer 'abcdefgh', the first half
    of training teaches that, the second half (file order, no shuffle) teaches 'hgfedcba'
    (no repeated letters: a random tied-embedding model already predicts a repeat)."""
    from sd2_ray.testing.tokenizer import toy_tokenizer
    from sd2_ray.testing.toy import with_toy_topk

    tok = toy_tokenizer()

    def rows(text: str, n: int, tag: str):
        return [
            {
                "id": f"{tag}-{i}",
                "messages": [{"role": "user", "content": f"say {i % 5}"}],
                "response": text,
                "finish_reason": "stop",
            }
            for i in range(n)
        ]

    held = with_toy_topk(rows("abcdefgh", 8, "held"), tok)
    phases = rows("abcdefgh", 32, "a") + rows("hgfedcba", 32, "b")
    data = write_rows(str(inputs["root"] / "phases"), with_toy_topk(phases, tok) + held)
    keep = str(inputs["root"] / "phases-ckpt")
    cfg = finetune(
        inputs,
        "phases",
        data=data,
        workers=2,
        zero_stage=2,
        max_steps=None,
        lr=3e-3,
        scheduler="constant",
        warmup_steps=0,
        shuffle_buffer=0,
        checkpoint_every=100,
        eval_every=1,
        eval_rows=8,
        select_by="expected_mal",
        keep_checkpoints=1,
        storage_path=keep,
    )
    result = run_finetune(cfg)
    mal = {h["step"]: h["expected_mal"] for h in result.history if "expected_mal" in h}
    assert sorted(mal) == list(range(1, 9))
    best = max(mal, key=lambda s: (mal[s], s))  # ties: the later step
    assert best < 8 and mal[best] > mal[8] + 0.5, mal
    metrics = storage.read_json(storage.join(result.output, "metrics.json"))
    assert metrics["published_step"] == best and metrics["selection"]["value"] == pytest.approx(mal[best])
    # the published weights are that step's (converted from its ZeRO files), not the final ones
    published = heldout_acceptance(storage.local_dir(result.output), held)
    final = heldout_acceptance(os.path.join(keep, "drafter", "final", "model"), held)
    assert published["expected_mal"] == pytest.approx(mal[best], rel=1e-4)
    assert final["expected_mal"] == pytest.approx(mal[8], rel=1e-4)
    assert masked_weights_nonzero(load_model(storage.local_dir(result.output)), load_masks(inputs["model"])) == 0
