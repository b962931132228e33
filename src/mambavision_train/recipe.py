"""What a run is about to train, said before it starts: the effective recipe, and how it differs from the paper's.

The paper's recipe for a model is our ``experiment=paper_<size>`` config (its values come from the official YAMLs;
the differences we keep from the official code are listed in docs/reproduce.md). A run is compared with it key by
key over the settings that change the result, so ``python train.py model=mambavision_b`` says that it trains with
AdamW rather than the paper's LAMB before a 300-epoch run starts.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from . import tables

# The settings that define what is trained (not where it is written, how often it is logged, or how it is read).
RECIPE_KEYS = (
    "model.name", "model.img_size", "model.crop_pct", "model.drop_path_rate", "model.freeze",
    "optim.name", "optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.layer_decay",
    "sched.warmup_epochs", "sched.warmup_lr", "sched.min_lr", "sched.cooldown_epochs",
    "epochs", "batch_size", "micro_batch_size", "clip_grad", "seed", "amp",
    "ema.enabled", "ema.decay", "ema.warmup", "mesa.weight", "mesa.start_ratio", "data.num_classes",
)


def recipe_keys(cfg) -> list[str]:
    return [*RECIPE_KEYS, *(f"aug.{k}" for k in cfg.aug)]


def paper_experiment(model_name: str) -> str:
    return f"paper_{model_name}"


def paper_config(cfg):
    """The paper recipe for this run's model, composed from its experiment config; None where there is none (the
    demo, the 21K fine-tuned variants) or where no Hydra app is running (a config built by hand)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    hydra = GlobalHydra.instance()
    name = paper_experiment(cfg.model.name)
    if not hydra.is_initialized() or name not in hydra.config_loader().get_group_options("experiment"):
        return None
    return compose("train", overrides=[f"experiment={name}"])


def differences(cfg, paper) -> list[tuple[str, object, object]]:
    """(key, this run's value, the paper's value) for every recipe setting that differs."""
    out = []
    for key in recipe_keys(cfg):
        mine, theirs = OmegaConf.select(cfg, key), OmegaConf.select(paper, key)
        mine, theirs = (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (mine, theirs))
        if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            out.append((key, mine, theirs))
    return out


def describe(cfg, *, world_size: int, accumulation: int, amp: str, device: str, paper,
             scan: str = "auto") -> list[tuple[str, str]]:
    """The recipe as (setting, value) rows, the last one the comparison with the paper."""
    m, o, s, a, d = cfg.model, cfg.optim, cfg.sched, cfg.aug, cfg.data
    on = lambda flag, text: text if flag else "off"
    rows = [
        ("model", f"{m.name}, drop path {m.drop_path_rate if m.drop_path_rate is not None else 'the variant default'}"
                  f", {m.img_size or 'default'} px, validation crop_pct {m.crop_pct or 'the variant default'}"),
        ("optimizer", f"{o.name}, lr {o.lr:g} (absolute), weight decay {o.weight_decay:g}, betas {list(o.betas)}, "
                      f"eps {o.eps:g}, clip grad norm {cfg.clip_grad}"),
        ("schedule", f"{cfg.epochs} epochs cosine + {s.cooldown_epochs} cooldown at {s.min_lr:g}, warm-up "
                     f"{s.warmup_epochs} epochs from {s.warmup_lr:g}"),
        ("batch", f"{cfg.batch_size} per step = {cfg.micro_batch_size} per device x {world_size} device(s) x "
                  f"{accumulation} accumulation"),
        ("EMA", on(cfg.ema.enabled, f"decay {cfg.ema.decay:g} (timm ModelEmaV2"
                                    f"{', with ModelEmaV3 warm-up' if cfg.ema.warmup else ''}), selects best.pth.tar")),
        ("MESA", on(cfg.mesa.weight > 0, f"weight {cfg.mesa.weight:g} after {cfg.mesa.start_ratio:.0%} of the epochs")),
        ("AMP", f"{cfg.amp} -> {amp} on {device}"),
        ("numerics", f"selective scan {cfg.model.scan_impl or 'auto'} -> {scan}; deterministic "
                     f"{'on' if cfg.deterministic else 'off'}"),
        ("augmentation", f"crop scale {list(a.scale)}, flip {a.hflip:g}, RandAugment {a.rand_augment or 'off'}, "
                         f"jitter {a.color_jitter:g}{'' if a.force_color_jitter or not a.rand_augment else ' (off under RandAugment)'}, "
                         f"Mixup {a.mixup:g} / CutMix {a.cutmix:g} (prob {a.mixup_prob:g}), erasing {a.reprob:g} "
                         f"{a.remode}, smoothing {a.smoothing:g}, seed {cfg.seed} + rank"),
        ("data", f"{d.kind} loader, root {d.root}, {d.num_classes} classes, {d.num_workers} workers per process"),
        ("weights", f"from {cfg.init_from} (classifier: {cfg.init_head})" if cfg.init_from else "random init"),
    ]
    if paper is None:
        rows.append(("vs paper", f"no paper training recipe for {m.name}"))
    else:
        diff = differences(cfg, paper)
        exp = paper_experiment(m.name)
        rows.append(("vs paper", f"= paper recipe (experiment={exp})" if not diff else
                     f"differs from experiment={exp}: " + "; ".join(f"{k} {v} (paper {p})" for k, v, p in diff)))
    return rows


def as_text(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(["recipe:"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def as_markdown(rows) -> str:
    return "# Recipe\n\n" + tables.markdown(["setting", "value"], rows) + "\n"


def announce(cfg, run_dir: Path, out=print, **kwargs):
    """Rank 0: print the recipe block (through ``out``, the run's log) and write it to ``run_dir/recipe.md``."""
    rows = describe(cfg, paper=paper_config(cfg), **kwargs)
    out(as_text(rows))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.md").write_text(as_markdown(rows))
    return rows
