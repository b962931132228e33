"""Train MambaVision: `python train.py experiment=paper_mambavision_t`, `make demo`, docs/training.md."""

import hydra

from mambavision_train.cli import entry, run_main


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg):
    from mambavision_train.engine.trainer import Trainer
    from mambavision_train.preflight import dry_run
    if cfg.dry_run:
        return run_main(lambda: dry_run(cfg, "train"))
    return run_main(lambda: Trainer(cfg).fit()["best_top1"])


if __name__ == "__main__":
    entry(main)
