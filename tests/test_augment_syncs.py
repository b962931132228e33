"""The device augmentation never makes the host wait for the GPU, and its RandAugment gives every image what the
op-by-op definition (``randaugment._apply``, tested against timm's PIL ops in test_data.py) gives it alone."""

import random
import threading

import numpy as np
import pytest
import torch

from helpers.imagetree import photo
from mambavision_train.data import randaugment as ra
from mambavision_train.data.augment import AugConfig, DeviceAugment
from helpers.syncs import host_syncs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photos():
    """24 real photos as a float batch of whole grey levels, with the edge cases of the statistics-driven ops: a flat
    image (AutoContrast and Equalize leave it alone) and one with a flat channel and a two-level one."""
    x = torch.stack([torch.from_numpy(np.array(photo(i, size=(40, 32)))).permute(2, 0, 1) for i in range(24)]).float()
    x[0] = 7.0
    x[1, 0], x[1, 1] = 255.0, (torch.arange(40) % 2 * 200.0)
    return x


def test_host_syncs_counts_what_waits_for_the_device_and_only_in_its_thread():
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    with host_syncs() as s:
        x.sum().item()
        if mask.any():
            x[mask] = 0.0
        x[mask.nonzero()[:, 0]]  # a long index: the nonzero is the sync, the indexing is not
        x.tolist()
        x.new_tensor([1.0, 2.0])
        x.to("cpu", non_blocking=True), x.to(torch.float64), torch.where(mask, x, 1.0), x[torch.arange(2)]
        other = threading.Thread(target=lambda: x.sum().item())  # another thread: not counted
        other.start(), other.join()
    assert s.ops == {"aten._local_scalar_dense.default": 2, "aten.index_put_.default": 1, "aten.nonzero.default": 1,
                     "Tensor.tolist": 1, "Tensor.new_tensor": 1}, s
    assert s.count == 6 and all(site.startswith(__file__) for _, site in s.events), s
    assert s.launches > s.count


@pytest.mark.parametrize("jitter", [False, True])
def test_paper_augmentation_makes_no_host_sync(photos, jitter):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    x, y = photos.to(torch.uint8), torch.arange(24) % 10
    # RandAugment m9 mstd0.5, Mixup/CutMix in batch mode, erasing 0.25 (and colour jitter, which timm turns off
    # under RandAugment, forced on)
    aug = DeviceAugment(AugConfig(force_color_jitter=jitter), 10, MEAN, STD, "cpu")
    with host_syncs() as s:
        for _ in range(3):  # Mixup and CutMix, erased and not
            aug(x, y)
    assert s.count == 0, s  # none, where issue 19 allows 2 per batch
    with host_syncs() as s:
        ra.rand_augment(x.float(), prob=1.0, magnitude_std=3.0)
    assert s.count == 0, s


def reference(x, seed, magnitude, magnitude_std, prob, num_layers=2):
    """RandAugment image by image with ``_apply``, drawing in timm's order per layer: op, applied, magnitude,
    sign, interpolation (each a batch-sized draw, as rand_augment makes them)."""
    g, b = torch.Generator().manual_seed(seed), x.shape[0]
    out, drawn = x.clone(), set()
    for _ in range(num_layers):
        op, applied = torch.randint(len(ra.OPS), (b,), generator=g), torch.rand(b, generator=g) < prob
        mag = (magnitude + magnitude_std * torch.randn(b, generator=g)).clamp(0, 10)
        sign = torch.where(torch.rand(b, generator=g) > 0.5, -1.0, 1.0)
        bicubic = torch.rand(b, generator=g) < 0.5
        for i in range(b):
            if applied[i]:
                name = ra.OPS[op[i]]
                drawn.add(name)
                out[i] = ra._apply(name, out[i:i + 1], mag[i:i + 1], sign[i:i + 1], bicubic[i:i + 1]).round()[0]
    return out, drawn


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_rand_augment_gives_each_image_what_apply_gives_it_alone(photos, layout):
    x = photos
    seen = set()
    for seed, cfg in ((0, dict(magnitude=9.0, magnitude_std=0.5, prob=0.5)),  # the paper's
                      (1, dict(magnitude=9.0, magnitude_std=3.0, prob=1.0)),
                      (2, dict(magnitude=5.0, magnitude_std=5.0, prob=1.0))):
        want, drawn = reference(x, seed, **cfg)
        got = ra.rand_augment(x.contiguous(memory_format=layout), generator=torch.Generator().manual_seed(seed), **cfg)
        assert torch.equal(got, want), (seed, (got != want).sum().item())
        seen |= drawn
    assert seen == set(ra.OPS)  # every op was drawn and compared
