"""Speculative decoding with images is lossless: the vision engine's greedy output equals LLaVA's
own ``generate`` (pixel values in, image features merged by transformers), with a MASSV drafter,
a text-only drafter and none, on batches that mix image rows, a text row and a two-image row;
sampling follows LLaVA's distribution. Tiny untrained models with a random untied LM head
(:func:`~sd2_ray.testing.vision.varied_head`), so outputs differ by image and the checks can
fail. The vision tower runs once per batch when the drafter carries the target's."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from sd2_ray.models.io import load_tokenizer
from sd2_ray.specdec.sampling import RowParams, warp_probs
from sd2_ray.specdec.types import GenerationRequest, SamplingParams
from sd2_ray.testing.engine_pairs import hf_greedy, noisy_copy
from sd2_ray.testing.vision import scene_pixels, tiny_vision_dirs, varied_head
from sd2_ray.vision.data import prompt_ids
from sd2_ray.vision.model import load_vlm
from sd2_ray.vision.prefill import VisionSpecEngine, text_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = 2
NEW = 16
# (question, images): image rows of different prompt lengths, a text row, a two-image row
ROWS = [
    ("Describe the image.", 1),
    ("What colour is the square at the top left of the picture?", 1),
    ("How many shapes are there?", 0),
    ("What is at the top left?", 2),
    ("How many red shapes are there?", 1),
]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def with_tower_of(drafter, target):
    """A LLaVA drafter given the target's vision tower (a MASSV drafter's: shared, run once)."""
    drafter.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    return drafter


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    dirs = tiny_vision_dirs(str(tmp_path_factory.mktemp("vision")))
    with torch.no_grad():
        target = varied_head(load_vlm(dirs["target"]), seed=0)
        tok = load_tokenizer(dirs["target"])
        image_token, patches = int(target.config.image_token_id), int(target.config.image_seq_length)
        pixels = scene_pixels(6, target.config)
        prompts, images, used = [], [], 0
        for question, n in ROWS:
            messages = [{"role": "user", "content": question}]
            prompts.append(prompt_ids(tok, messages, n, image_token, patches))
            images.append(tuple(pixels[used : used + n]))
            used += n
        refs = [llava_greedy(target, p, imgs, NEW) for p, imgs in zip(prompts, images, strict=True)]
        return SimpleNamespace(
            target=target,
            image_token=image_token,
            prompts=prompts,
            images=images,
            refs=refs,
            # own projector and LM (perturbed copies), the target's tower: a MASSV drafter
            massv=with_tower_of(noisy_copy(target, 0.15), target),
            other_tower=noisy_copy(target, 0.15),  # its tower perturbed too: not shared
            text=text_lm(noisy_copy(target, 0.15, seed=8)),  # a plain causal LM, no images
            built=varied_head(load_vlm(dirs["drafter"]), seed=1),  # vision.model.build_drafter's
        )


def llava_greedy(target, prompt, images, n: int) -> list[int]:
    """LLaVA's own greedy continuation (batch 1): transformers merges the image features."""
    pixels = {"pixel_values": torch.stack(images)} if images else {}  # a text row: no pixels at all
    return hf_greedy(target, prompt, n, EOS, **pixels)


def requests(vlm, rows=None, **kwargs) -> list[GenerationRequest]:
    rows = range(len(ROWS)) if rows is None else rows
    return [GenerationRequest(vlm.prompts[i], NEW, images=vlm.images[i], **kwargs) for i in rows]


def test_references_vary_with_the_image(vlm):
    """The comparisons below can fail: outputs differ by row and depend on the image."""
    assert len({tuple(r) for r in vlm.refs}) == len(vlm.refs)
    assert all(len(set(r)) > 2 for r in vlm.refs)
    swapped = (vlm.images[1][0],)
    assert llava_greedy(vlm.target, vlm.prompts[0], swapped, NEW) != vlm.refs[0]


@pytest.mark.parametrize("cache", ["static", "growing"])
@pytest.mark.parametrize("drafter", ["massv", "text", "none"])
def test_greedy_equals_llava_generate(vlm, drafter, cache):
    model = None if drafter == "none" else getattr(vlm, drafter)
    engine = VisionSpecEngine(vlm.target, model, 3, static_cache=cache == "static")
    results = engine.generate(requests(vlm))
    assert [r.token_ids for r in results] == vlm.refs
    assert engine.tower_runs == 1
    if model is not None:
        assert sum(r.stats.num_accepted_tokens for r in results) > 0  # the drafter drafts something right
        assert all(1.0 <= r.stats.mean_accepted_length <= 4 for r in results)


def test_batch_of_one_and_max_batch_size_give_the_same_tokens(vlm):
    engine = VisionSpecEngine(vlm.target, vlm.massv, 3, max_batch_size=2)
    assert [r.token_ids for r in engine.generate(requests(vlm))] == vlm.refs
    assert engine.tower_runs == 3  # batches [0, 1], [2, 3], [4]: each has an image
    single = VisionSpecEngine(vlm.target, vlm.massv, 3)
    alone = [single.generate(requests(vlm, [i]))[0].token_ids for i in range(len(ROWS))]
    assert alone == vlm.refs
    assert single.tower_runs == len(ROWS) - 1  # the text row alone runs no tower


def test_tower_runs_once_when_shared_twice_when_not(vlm):
    for drafter, shared in ((vlm.massv, True), (vlm.built, True), (vlm.other_tower, False)):
        engine = VisionSpecEngine(vlm.target, drafter, 3)
        assert engine.shared_tower is shared
        assert [r.token_ids for r in engine.generate(requests(vlm))] == vlm.refs
        assert engine.tower_runs == (1 if shared else 2)
    text_rows = VisionSpecEngine(vlm.target, vlm.massv, 3)
    text_rows.generate(requests(vlm, [2]))
    assert text_rows.tower_runs == 0


def test_drafter_that_is_the_target_accepts_every_draft(vlm):
    """The drafter's LM shares the target's modules (its embedding included): each side's
    prefill still gets the image features once."""
    engine = VisionSpecEngine(vlm.target, vlm.target, 3)
    results = engine.generate(requests(vlm))
    assert [r.token_ids for r in results] == vlm.refs
    assert engine.tower_runs == 1
    for r in results:
        assert r.stats.num_accepted_tokens == r.stats.num_draft_tokens > 0


def test_drafted_image_tokens_read_as_tokens(vlm):
    """A drafter that drafts ``<image>`` puts it in the target's prefill chunk right after each
    row's prompt: it must read as the token (LLaVA's decoding), not take another row's features."""
    drafter = text_lm(copy.deepcopy(vlm.target))
    head = torch.nn.Linear(drafter.lm_head.in_features, drafter.lm_head.out_features, bias=True)
    head.weight.zero_()
    head.bias.zero_()
    head.bias[vlm.image_token] = 10.0
    drafter.lm_head = head
    for cache in ("static", "growing"):
        engine = VisionSpecEngine(vlm.target, drafter, 3, static_cache=cache == "static")
        assert [r.token_ids for r in engine.generate(requests(vlm))] == vlm.refs


def test_wrong_image_count_names_the_request(vlm):
    engine = VisionSpecEngine(vlm.target, vlm.massv, 3)
    bad = [
        GenerationRequest(vlm.prompts[0], 4, images=vlm.images[0]),
        GenerationRequest(vlm.prompts[3], 4, images=vlm.images[0]),
    ]
    with pytest.raises(ValueError, match="request 1: 8 image positions in the prompt for 1 image"):
        engine.generate(bad)
    with pytest.raises(ValueError, match="request 0: 0 image positions"):
        engine.generate([GenerationRequest(vlm.prompts[2], 4, images=vlm.images[0])])
    with pytest.raises(ValueError, match="request 0: 4 image positions in the prompt for 0 image"):
        engine.generate([GenerationRequest(vlm.prompts[0], 4)])


def test_rows_finishing_early_leave_other_rows_images_in_place(vlm):
    """A zero budget (never decoded: its image must not be fed to anyone), a one-token budget,
    a stop token mid-answer, and full rows, in one batch."""
    stop = vlm.refs[4][2]
    reqs = [
        GenerationRequest(vlm.prompts[0], 0, images=vlm.images[0]),
        GenerationRequest(vlm.prompts[1], 1, images=vlm.images[1]),
        GenerationRequest(vlm.prompts[4], NEW, images=vlm.images[4], stop_token_ids=(stop,)),
        GenerationRequest(vlm.prompts[3], NEW, images=vlm.images[3]),
        GenerationRequest(vlm.prompts[2], NEW),
        GenerationRequest(vlm.prompts[0], NEW, images=vlm.images[0]),
    ]
    for drafter in (vlm.massv, vlm.text):
        out = [r.token_ids for r in VisionSpecEngine(vlm.target, drafter, 3).generate(reqs)]
        cut = vlm.refs[4].index(stop) + 1
        assert out == [[], vlm.refs[1][:1], vlm.refs[4][:cut], vlm.refs[3], vlm.refs[2], vlm.refs[0]]


def test_sampled_rows_reproduce_whatever_their_batch(vlm):
    """A seeded request's samples depend on its seed and images only: again, alone or batched
    with greedy rows, the same tokens (greedy rows still LLaVA's)."""
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=3)
    reqs = requests(vlm)
    for i in (0, 3):
        reqs[i] = GenerationRequest(vlm.prompts[i], NEW, SamplingParams(1.0, top_k=20, seed=i), images=vlm.images[i])
    engine = VisionSpecEngine(vlm.target, vlm.massv, 3)
    first = [r.token_ids for r in engine.generate(reqs)]
    assert [r.token_ids for r in engine.generate(reqs)] == first
    for i in (0, 3):
        assert engine.generate([reqs[i]])[0].token_ids == first[i]
    assert [first[i] for i in (1, 2, 4)] == [vlm.refs[i] for i in (1, 2, 4)]
    other = GenerationRequest(vlm.prompts[0], NEW, sampled, images=vlm.images[1])
    assert (
        engine.generate([other])[0].token_ids
        != engine.generate([GenerationRequest(vlm.prompts[0], NEW, sampled, images=vlm.images[0])])[0].token_ids
    )


# ---- sampling: the output distribution is LLaVA's --------------------------------------------


def llava_joint(target, prompt, images, sp: SamplingParams) -> torch.Tensor:
    """P(first two generated tokens) under LLaVA's own forward with the image, warped: (V, V)."""
    pixels = torch.stack(images)
    logits = target(input_ids=torch.tensor([prompt]), pixel_values=pixels).logits[:, -1:]
    first = warp_probs(logits, RowParams.from_params([sp]))[0, 0]
    support = first.nonzero().flatten().tolist()
    seqs = torch.tensor([prompt + [a] for a in support])
    logits = target(input_ids=seqs, pixel_values=pixels.repeat(len(support), 1, 1, 1)).logits[:, -1:]
    second = warp_probs(logits, RowParams.from_params([sp] * len(support)))[:, 0]
    joint = torch.zeros(len(first), len(first))
    joint[support] = first[support].unsqueeze(1) * second
    return joint


def sampled_joint(engine, prompt, images, sp: SamplingParams, n: int, vocab: int) -> tuple[torch.Tensor, float]:
    """The empirical joint of the first two tokens over ``n`` seeds, and the share of drafts accepted."""
    reqs = [
        GenerationRequest(prompt, 3, SamplingParams(sp.temperature, sp.top_p, sp.top_k, seed=s), images=images)
        for s in range(n)
    ]
    counts = torch.zeros(vocab, vocab)
    results = engine.generate(reqs)
    for r in results:
        counts[r.token_ids[0], r.token_ids[1]] += 1
    accepted = sum(r.stats.num_accepted_tokens for r in results) / sum(r.stats.num_draft_tokens for r in results)
    return counts / n, accepted


def test_sampling_matches_llava_distribution_and_catches_broken_rule(vlm):
    sp, n = SamplingParams(1.0, top_k=5), 1000
    prompt, images = vlm.prompts[0], vlm.images[0]
    exact = llava_joint(vlm.target, prompt, images, sp)
    vocab = exact.shape[0]
    bound = 3 * 0.5 * torch.sqrt(2 * exact * (1 - exact) / (torch.pi * n)).sum().item()
    drafter = with_tower_of(noisy_copy(vlm.target, 0.2, seed=11), vlm.target)
    good = VisionSpecEngine(vlm.target, drafter, 2, eos_token_ids=())
    joint, accepted = sampled_joint(good, prompt, images, sp, n, vocab)
    tv_good = 0.5 * (joint - exact).abs().sum().item()
    assert 0.1 < accepted < 0.9  # both the acceptance test and the residual resample are exercised
    broken = VisionSpecEngine(vlm.target, drafter, 2, eos_token_ids=(), accept_rule=lambda p, q, u: u < 1.0)
    tv_broken = 0.5 * (sampled_joint(broken, prompt, images, sp, n, vocab)[0] - exact).abs().sum().item()
    print(f"TV good {tv_good:.4f} (accepted {accepted:.2f}), broken {tv_broken:.4f}, bound {bound:.4f}")
    assert tv_good < bound, (tv_good, bound)
    assert tv_broken > bound, (tv_broken, bound)  # always accepting = sampling the drafter
