"""Train-pipeline throughput: decode + RandomResizedCrop + flip to 224 px uint8 batches of 64, 2 workers.

    python benchmarks/data_pipeline.py [--images 2000] [--rounds 3] [--workers 2]

Side by side on the same ~500x375 JPEGs (made from photos that ship with scikit-image): our FFCV loader, stock FFCV
(RandomResizedCropRGBImageDecoder), torchvision decode_jpeg + transforms v2, torchvision ImageFolder + PIL.
Reports images/s and CPU-ms per image (process + worker CPU time) over whole epochs after a warm-up epoch
(numba compilation excluded), the crop quality (PSNR against PIL's antialiased bicubic resize of the same box),
the single-core JPEG decode rate, and the cost of the full paper augmentation on the CPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import machine

RES, BS = 224, 64


def make_images(root: Path, n: int):
    if (root / "src" / ".done").exists():
        return
    from skimage import data
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
              np.asarray(Image.fromarray(data.hubble_deep_field()).resize((600, 500)))]
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(arr[y:y + ch, x:x + cw]).resize((500, 375), Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / "src" / "train" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:05d}.JPEG", quality=90)
    (root / "src" / ".done").touch()


def cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def run_epoch(loader, set_epoch=None, epoch=0):
    if set_epoch:
        set_epoch(epoch)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    for x, _ in loader:
        n += x.shape[0]
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def ours(beton, workers):
    from mambavision_train.data.ffcv_loader import FFCVLoader
    loader = FFCVLoader(beton, train=True, batch_size=BS, res=RES, num_workers=workers)
    return loader, loader.set_epoch


def stock_ffcv(beton, workers):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor
    return Loader(str(beton), batch_size=BS, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                  drop_last=True, pipelines={"image": [RandomResizedCropRGBImageDecoder((RES, RES)),
                                                       RandomHorizontalFlip(), ToTensor()],
                                             "label": [IntDecoder(), ToTensor()]}), None


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, tf, mode):
        self.files, self.tf, self.mode = files, tf, mode

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torchvision
        if self.mode == "tv":
            img = torchvision.io.decode_jpeg(torchvision.io.read_file(str(self.files[i])))
        else:
            img = Image.open(self.files[i]).convert("RGB")
        return self.tf(img), 0


def torchvision_loader(files, workers, mode):
    from torchvision.transforms import v2
    tf = v2.Compose([v2.RandomResizedCrop(RES, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()
                     if mode == "pil" else v2.Identity()])
    return torch.utils.data.DataLoader(_Files(files, tf, mode), batch_size=BS, shuffle=True, num_workers=workers,
                                       drop_last=True), None


def crop_quality(beton, n=200):
    """PSNR of 224 px crops against PIL's antialiased bicubic resize of the same box of the stored image: ours
    (through the loader) and stock FFCV's method (FFCV's full decode + its INTER_AREA resize_crop)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor
    from mambavision_train.data.ffcv_decoder import CropResizeDecoder, random_resized_crop
    from mambavision_train.data.order import sample_key
    r = Reader(str(beton))
    sizes = {int(p): int(s) for p, s in zip(r.alloc_table["ptr"], r.alloc_table["size"])}
    raw = Path(beton).read_bytes()
    dec = CropResizeDecoder((RES, RES), mode="random", flip_prob=0.0, seed=5)
    loader = Loader(str(beton), batch_size=n, num_workers=2, order=OrderOption.SEQUENTIAL, indices=list(range(n)),
                    pipelines={"image": [dec, ToTensor()], "label": [IntDecoder(), ToTensor()]})
    ours = next(iter(loader))[0].numpy()
    psnr = {"ours (box + bilinear, DCT scaling when possible)": [], "stock FFCV (full decode + INTER_AREA)": []}
    stock = np.empty((RES, RES, 3), np.uint8)
    for i in range(n):
        m = r.metadata[i]["f0"]
        ptr, h, w = int(m["data_ptr"]), int(m["height"]), int(m["width"])
        full = np.empty((h, w, 3), np.uint8)
        imdecode(np.frombuffer(raw[ptr:ptr + sizes[ptr]], np.uint8), full, h, w, h, w, 0, 0, 1, 1, False, False)
        top, left, ch, cw = random_resized_crop(h, w, 0.08, 1.0, np.log(3 / 4), np.log(4 / 3),
                                                np.uint64(sample_key(5, 0, i)))
        ref = np.asarray(Image.fromarray(full).crop((left, top, left + cw, top + ch)).resize((RES, RES), Image.BICUBIC),
                         np.float64)
        resize_crop(full, top, top + ch, left, left + cw, stock)
        for k, o in zip(psnr, (ours[i], stock)):
            psnr[k].append(10 * np.log10(255 ** 2 / np.mean((o.astype(np.float64) - ref) ** 2)))
    return {k: float(np.mean(v)) for k, v in psnr.items()}


def decode_rate(files, n=300):
    import cv2
    from ffcv.libffcv import imdecode
    blobs = [np.frombuffer(Path(f).read_bytes(), np.uint8) for f in files[:n]]
    dst = np.empty((375, 500, 3), np.uint8)
    cv2.setNumThreads(1)
    t = time.perf_counter()
    for b in blobs:
        imdecode(b, dst, 375, 500, 375, 500, 0, 0, 1, 1, False, False)
    turbo = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for f in files[:n]:
        Image.open(f).convert("RGB").load()
    return turbo, n / (time.perf_counter() - t)


def augment_cost(batches=3):
    from mambavision_train.data.augment import AugConfig, DeviceAugment
    aug = DeviceAugment(AugConfig(), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "cpu")
    x = torch.randint(0, 256, (BS, 3, RES, RES), dtype=torch.uint8)
    y = torch.randint(0, 1000, (BS,))
    aug(x, y)
    t = time.perf_counter()
    for _ in range(batches):
        aug(x, y)
    return (time.perf_counter() - t) / (batches * BS) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/mambavision_bench_data")
    args = ap.parse_args()
    torch.set_num_threads(args.workers)
    root = Path(args.dir)
    make_images(root, args.images)
    beton = root / "ffcv" / "train.beton"
    if not beton.exists():
        from mambavision_train.data.convert import ConvertOptions, convert
        t = time.perf_counter()
        res = convert(root / "src", root / "ffcv", ("train",), ConvertOptions(max_side=512, workers=args.workers))
        print(f"conversion: {res[0]['images']} images in {time.perf_counter() - t:.1f} s, "
              f"{beton.stat().st_size / res[0]['images'] / 1024:.1f} KiB/image")
    files = sorted((root / "src" / "train").glob("*/*.JPEG"))
    pipelines = {"ours: FFCV + CropResizeDecoder": ours(beton, args.workers),
                 "stock FFCV (RandomResizedCropRGBImageDecoder)": stock_ffcv(beton, args.workers),
                 "torchvision decode_jpeg + transforms v2": torchvision_loader(files, args.workers, "tv"),
                 "torchvision ImageFolder-style + PIL": torchvision_loader(files, args.workers, "pil")}
    for loader, set_epoch in pipelines.values():  # warm-up: numba compilation, page cache
        run_epoch(loader, set_epoch)
    results = {k: [] for k in pipelines}
    for r in range(args.rounds):
        for name, (loader, set_epoch) in pipelines.items():
            results[name].append(run_epoch(loader, set_epoch, epoch=r + 1))
    print(f"# data pipeline, {args.images} JPEGs 500x375 q90 -> {RES} px uint8, batch {BS}, {args.workers} workers;"
          f" {machine()}")
    print("| pipeline | img/s | CPU-ms/img | vs stock FFCV |")
    print("|---|---|---|---|")
    stock = None
    for name, runs in results.items():
        ips = statistics.median(n / wall for n, wall, _ in runs)
        cpu = statistics.median(c / n * 1e3 for n, _, c in runs)
        stock = ips if "stock" in name else stock
        results[name] = (ips, cpu)
    for name, (ips, cpu) in results.items():
        print(f"| {name} | {ips:.0f} | {cpu:.2f} | {ips / stock:.2f}x |")
    turbo, pil = decode_rate(files)
    print(f"\nsingle-core full decode: libjpeg-turbo (FFCV imdecode) {turbo:.0f} img/s, PIL {pil:.0f} img/s; "
          f"two-core limit ~{2 * turbo:.0f} img/s; ours reaches "
          f"{100 * results['ours: FFCV + CropResizeDecoder'][0] / (2 * turbo):.0f}% of it")
    print("\ncrop quality, mean PSNR vs PIL antialiased bicubic of the same box (200 crops):")
    for k, v in crop_quality(beton).items():
        print(f"- {k}: {v:.2f} dB")
    print(f"\nfull paper augmentation on the CPU (RandAugment, erasing, Mixup/CutMix, normalise; batch {BS}): "
          f"{augment_cost():.2f} ms/img")


if __name__ == "__main__":
    main()
