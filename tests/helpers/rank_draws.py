"""Run under torchrun by tests/test_distributed.py: builds the Trainer from the real configs, then records what this
rank draws in one training step (the Mixup/CutMix lambda, the DropPath masks) and a digest of its initial weights.
Usage: rank_draws.py OUT_PREFIX [overrides...]; writes OUT_PREFIX.<rank>.json."""

import hashlib
import json
import sys

import torch
from hydra import compose, initialize_config_dir
from timm.layers import DropPath

from mambavision_train.config import register
from mambavision_train.distributed import cleanup
from mambavision_train.engine.trainer import Trainer
from helpers.runs import ROOT


def main(out: str, overrides: list[str]):
    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        trainer = Trainer(compose("train", overrides=overrides))
    digest = hashlib.sha256()
    for v in trainer.model.state_dict().values():
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    lams, masks = [], []
    mixup = trainer.train_aug.mixup
    draw = mixup._params_per_batch

    def recorded():
        lam, cutmix = draw()
        lams.append([float(lam), bool(cutmix)])
        return lam, cutmix

    mixup._params_per_batch = recorded
    for m in trainer.model.modules():
        if isinstance(m, DropPath):  # a dropped sample leaves the branch all zeros
            m.register_forward_hook(lambda mod, inp, o: masks.append((o.flatten(1) == 0).all(1).tolist()))
    trainer.train_loader.set_epoch(0)
    trainer.train_step(iter(trainer.train_loader))
    with open(f"{out}.{trainer.dist.rank}.json", "w") as f:
        json.dump({"init": digest.hexdigest(), "lams": lams, "masks": masks}, f)
    cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2:])
