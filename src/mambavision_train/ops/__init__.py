"""Custom operators, each with a PyTorch implementation that runs everywhere."""
from .selective_scan import available_impls, selective_scan

__all__ = ["selective_scan", "available_impls"]
