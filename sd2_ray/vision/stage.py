"""The fine-tune driver's MASSV step (no Ray): a text drafter given to a MASSV phase is first made
a LLaVA drafter (the target VLM's vision tower, a fresh projector, the text LM and its masks),
staged once under the output so every worker, on any node, reads it from the same storage."""

from __future__ import annotations

import logging
import tempfile

from sd2_ray import storage
from sd2_ray.config import KIT_PREFIX
from sd2_ray.errors import ConfigError

log = logging.getLogger(__name__)

INIT_DIR = "_massv_init"  # under the output: the drafter phase 1 starts from
READY = "massv_init.json"  # written last: the staged drafter is whole


def drafter_model(config):
    """``config`` with ``model`` a LLaVA drafter: as given when it is one, else built from the
    text LM ``model`` and ``massv.target`` (once; a rerun reuses the staged copy)."""
    from sd2_ray.models.io import model_metadata_dir
    from sd2_ray.vision.model import is_vlm_dir

    settings = config.massv
    if settings is None or is_vlm_dir(model_metadata_dir(config.model)):
        return config
    if settings.target is None:
        raise ConfigError("massv.target: needed when `model` is a text LM (its vision tower makes the drafter)")
    target = settings.target
    if target.startswith(KIT_PREFIX):  # a nested path: the stage's kit paths are only its own fields
        from sd2_ray.kit import kit_part

        target = kit_part(target, "massv.target", **config.kit_overrides())
        settings = settings.model_copy(update={"target": target})
    if not is_vlm_dir(model_metadata_dir(target)):
        raise ConfigError(f"massv.target: {target} is not a LLaVA vision-language model dir")
    staged = storage.join(config.output, INIT_DIR)
    if config.overwrite or not storage.exists(storage.join(staged, READY)):
        _stage(config.model, target, staged, settings.seed)
    log.info("finetune: MASSV drafter from %s with %s's vision tower, staged at %s", config.model, target, staged)
    return config.model_copy(update={"model": staged, "massv": settings})


def _stage(text: str, target: str, staged: str, seed: int) -> None:
    from sd2_ray.vision.massv import init_drafter

    with tempfile.TemporaryDirectory(prefix="sd2-massv-") as tmp:
        init_drafter(storage.local_dir(text), storage.local_dir(target), tmp, seed=seed)
        storage.write_json(f"{tmp}/{READY}", {"text": text, "target": target, "seed": seed})
        if storage.is_s3(staged):
            storage.copy_dir(tmp, staged)
        else:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(tmp, staged)
