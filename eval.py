"""Evaluate MambaVision weights on ImageNet-1K (or any data config): docs/reproduce.md."""

import hydra

from mambavision_train.cli import entry, run_main


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg):
    from mambavision_train.engine.eval_run import run_eval
    from mambavision_train.preflight import dry_run
    if cfg.dry_run:
        return run_main(lambda: dry_run(cfg, "eval"))
    return run_main(lambda: run_eval(cfg)["top1"])


if __name__ == "__main__":
    entry(main)
