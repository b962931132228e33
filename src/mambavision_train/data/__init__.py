"""Data: ImageNet-style folders -> FFCV files; loaders (FFCV, ImageFolder fallback, synthetic); device-side
augmentation. One interface: ``build_loader(data_cfg, aug_cfg, ...)`` -> (loader, device_augment).

Every loader yields (uint8 images (B, 3, H, W), int64 labels), has ``set_epoch(epoch, start_batch=0)``, ``len()``
and ``res`` (H = W), and reads only its rank's shard, in an order fixed by (seed, epoch).
"""

from ..config import AugConfig, DataConfig
from ..errors import DataError
from .augment import DeviceAugment
from .loader import FFCV_EXTRA, build_loader, check, class_map, ffcv_installed, num_images
from .order import Shard

__all__ = ["DataConfig", "AugConfig", "DataError", "DeviceAugment", "Shard", "build_loader", "check", "class_map",
           "num_images", "ffcv_installed", "FFCV_EXTRA"]
