"""A variant as a run asks for it, and how it is fed for evaluation: what training, eval.py, predict and export
share. The view is timm's ``resolve_model_data_config`` over the variant's ``default_cfg``, with the model config's
``img_size`` / ``crop_pct`` on top."""

from __future__ import annotations


def create_model(model_cfg, num_classes: int, **extra):
    """The variant a model config names, with the settings it gives (null: the variant's own)."""
    import timm
    from .. import models  # noqa: F401  (the variants, registered)
    settings = dict(scan_impl=model_cfg.scan_impl, img_size=model_cfg.img_size) | extra
    return timm.create_model(model_cfg.name, num_classes=num_classes,
                             **{k: v for k, v in settings.items() if v is not None})


def eval_view(model, img_size: int | None = None, crop_pct: float | None = None) -> dict:
    """The loader arguments that evaluate ``model`` as its card says: resolution, eval crop, interpolation, mean/std."""
    from timm.data import resolve_model_data_config
    args = {k: v for k, v in (("input_size", img_size and (3, img_size, img_size)), ("crop_pct", crop_pct)) if v}
    c = resolve_model_data_config(model, args=args)
    return dict(res=c["input_size"][-1], crop_pct=c["crop_pct"], crop_mode=c.get("crop_mode") or "center",
                interpolation=c["interpolation"], mean=c["mean"], std=c["std"])


def variant_data_args(model, model_cfg) -> dict:
    """``eval_view`` with a model config's overrides."""
    return eval_view(model, model_cfg.img_size, model_cfg.crop_pct)
