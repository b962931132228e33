"""Converter edge cases: hidden folders, undecodable file names, a stale scan cache, unexpected decode errors, images
over PIL's pixel limit, the worker default and the writer watch. Real files and real .beton files throughout."""

import io
import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from helpers.imagetree import jpeg_bytes, photo
from mambavision_train.data import convert as conv
from mambavision_train.data.convert import ConversionError, ConvertOptions, convert
from mambavision_train.data.images import BadImage, load_rgb
from test_data import psnr, read_beton

ONE = ConvertOptions(workers=1)


def small_tree(split_dir: Path, per_class=2) -> list[Path]:
    """Two classes of plain JPEGs; returns the files in ImageFolder order."""
    files = []
    for label, cls in enumerate(["n01", "n02"]):
        (split_dir / cls).mkdir(parents=True)
        for i in range(per_class):
            files.append(split_dir / cls / f"plain_{i}.JPEG")
            files[-1].write_bytes(jpeg_bytes(photo(10 * label + i, size=(48, 36))))
    return files


def skipped(out: Path, split="train") -> list[str]:
    return (out / f"{split}_skipped.txt").read_text(encoding="utf-8").splitlines()


def test_hidden_folders_and_files_are_ignored(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    plain = small_tree(src / "train")
    # What notebooks, macOS and editors leave behind: a hidden class, hidden subfolders and hidden files in classes.
    (src / "train" / ".ipynb_checkpoints").mkdir()
    (src / "train" / ".ipynb_checkpoints" / "x.JPEG").write_bytes(jpeg_bytes(photo(7, size=(48, 36))))
    (src / "train" / "n01" / ".ipynb_checkpoints").mkdir()
    (src / "train" / "n01" / ".ipynb_checkpoints" / "plain_0-checkpoint.JPEG").write_bytes(plain[0].read_bytes())
    (src / "train" / "n01" / "._plain_0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (src / "train" / "n02" / ".hidden.JPEG").write_bytes(jpeg_bytes(photo(8, size=(48, 36))))
    [r] = convert(src, out, ("train",), ONE)
    assert r["classes"] == ["n01", "n02"] and r["images"] == 4 and r["skipped"] == 0 and skipped(out) == []
    assert json.loads((out / "classes.json").read_text())["classes"] == ["n01", "n02"]
    stored = read_beton(out / "train.beton")
    assert [label for label, _, _ in stored] == [0, 0, 1, 1]
    for (_, _, pixels), path in zip(stored, plain):
        assert psnr(pixels, Image.open(path).convert("RGB")) > 30


def test_skip_report_escapes_any_file_name(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    small_tree(src / "train")
    cls = os.fsencode(src / "train" / "n01")
    with open(cls + b"/caf\xe9.JPEG", "wb") as f:  # Latin-1, not UTF-8: a good image must still be converted
        f.write(jpeg_bytes(photo(3, size=(48, 36))))
    with open(cls + b"/bad\xff\tname\n.JPEG", "wb"):  # empty, so skipped, with a tab and a newline in its name
        pass
    [r] = convert(src, out, ("train",), ONE)
    assert r["images"] == 5 and r["skipped"] == 1
    raw = (out / "train_skipped.txt").read_bytes()
    lines = raw.decode("utf-8").splitlines()  # valid UTF-8, one line per file
    assert len(lines) == 1
    name, reason = lines[0].split("\t")
    assert name == f"{src}/train/n01/bad\\xff\\tname\\n.JPEG" and reason.startswith("UnidentifiedImageError")
    assert len(read_beton(out / "train.beton")) == 5


def test_scan_cache_notices_changed_and_renamed_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    plain = small_tree(src / "train", per_class=3)
    (src / "train" / "n02" / "empty.JPEG").write_bytes(b"")
    redo = ConvertOptions(workers=1, overwrite=True)
    convert(src, out, ("train",), redo)
    cache = out / "train.scan.json"
    before = cache.stat().st_mtime_ns
    [r] = convert(src, out, ("train",), redo)  # nothing changed: the scan is reused, not redone
    assert cache.stat().st_mtime_ns == before and (r["images"], r["skipped"]) == (6, 1)

    # Same count, same size, a later mtime: the file was overwritten with something undecodable.
    data = bytearray(plain[1].read_bytes())
    data[:4] = b"\x00\x00\x00\x00"
    stat = plain[1].stat()
    plain[1].write_bytes(bytes(data))
    os.utime(plain[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert plain[1].stat().st_size == stat.st_size
    [r] = convert(src, out, ("train",), redo)
    assert (r["images"], r["skipped"]) == (5, 2)
    assert {line.split("\t")[0] for line in skipped(out)} == {str(plain[1]), str(src / "train/n02/empty.JPEG")}

    # Same count, a rename: the undecodable file under a name the old scan never saw.
    (src / "train/n02/empty.JPEG").rename(src / "train/n02/renamed.JPEG")
    [r] = convert(src, out, ("train",), redo)
    assert (r["images"], r["skipped"]) == (5, 2)
    assert {line.split("\t")[0] for line in skipped(out)} == {str(plain[1]), str(src / "train/n02/renamed.JPEG")}
    assert [label for label, _, _ in read_beton(out / "train.beton")] == [0, 0, 1, 1, 1]


def fractional_size_im() -> bytes:
    """An IFUNC image whose header gives a fractional width: PIL raises TypeError (not OSError) when decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "IM")
    return buf.getvalue().replace(b" 40*30", b" 40.5*30")


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
def test_any_decode_error_skips_the_file(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    small_tree(src / "train")
    odd = src / "train" / "n02" / "odd.JPEG"
    odd.write_bytes(fractional_size_im())
    with pytest.raises(TypeError):
        Image.open(odd).load()
    [r] = convert(src, out, ("train",), ONE)
    assert (r["images"], r["skipped"]) == (4, 1)
    assert skipped(out) == [f"{odd}\tTypeError: 'float' object cannot be interpreted as an integer"]
    assert [label for label, _, _ in read_beton(out / "train.beton")] == [0, 0, 1, 1]


def test_images_over_the_pixel_limit_are_downscaled_not_skipped(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "train" / "n01").mkdir(parents=True)
    big = {"error.JPEG": photo(1, size=(160, 120)),  # over twice the limit: DecompressionBombError, JPEG draft path
           "error_png.JPEG": photo(2, size=(120, 160)),  # the same as PNG data: no draft, a full decode
           "warning.JPEG": photo(3, size=(80, 90))}  # between the limit and twice it: DecompressionBombWarning
    for name, im in big.items():
        if name.startswith("error_png"):
            im.save(src / "train" / "n01" / name, "PNG")
        else:
            (src / "train" / "n01" / name).write_bytes(jpeg_bytes(im))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the test's own limit; the workers inherit it (fork)
    [r] = convert(src, out, ("train",), ConvertOptions(workers=1, max_side=64))
    assert (r["images"], r["skipped"]) == (3, 0) and skipped(out) == []
    stored = read_beton(out / "train.beton")
    assert [hw for _, hw, _ in stored] == [(48, 64), (64, 48), (64, 57)]  # ImageFolder order: sorted names
    for (_, (h, w), pixels), im in zip(stored, big.values()):
        assert psnr(pixels, im.resize((w, h), Image.BICUBIC)) > 28
    # In this process too: the large image decodes, and the limit is back afterwards.
    assert load_rgb(src / "train" / "n01" / "error.JPEG", 64).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 5000
    with pytest.raises(BadImage, match="DecompressionBomb"):  # full size was asked for: the limit holds
        load_rgb(src / "train" / "n01" / "error.JPEG")


def test_workers_default_to_the_slurm_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert ConvertOptions().workers == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert ConvertOptions().workers == len(os.sched_getaffinity(0))


def test_writer_watch_leaves_ffcv_alone_and_catches_a_killed_writer(tmp_path, monkeypatch):
    import multiprocessing

    import ffcv.writer
    src = tmp_path / "src"
    small_tree(src / "train", per_class=3)
    real = conv._FileDataset.__getitem__

    def in_the_writer(self, i):
        if ffcv.writer.Process is not multiprocessing.Process:  # seen from inside a writer process
            raise RuntimeError("ffcv.writer.Process was replaced")
        if i == 3 and self.kill:
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return real(self, i)

    monkeypatch.setattr(conv._FileDataset, "__getitem__", in_the_writer)
    monkeypatch.setattr(conv._FileDataset, "kill", False, raising=False)
    [r] = convert(src, tmp_path / "ok", ("train",), ONE)
    assert r["images"] == 6 and ffcv.writer.Process is multiprocessing.Process
    monkeypatch.setattr(conv._FileDataset, "kill", True, raising=False)
    with pytest.raises(ConversionError, match=r"an FFCV writer process died \(exit code -9\)"):
        convert(src, tmp_path / "killed", ("train",), ConvertOptions(workers=2))
    assert not (tmp_path / "killed" / "train.beton").exists()


def test_a_split_where_nothing_decodes_is_one_line(tmp_path):
    (tmp_path / "src" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "src" / "train" / "n01" / "empty.JPEG").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: none of the 1 images under .*train decodes; the reasons are in "):
        conv.main([str(tmp_path / "src"), str(tmp_path / "out"), "--splits", "train", "--workers", "1"])
    assert len(skipped(tmp_path / "out")) == 1


def test_a_checking_process_that_dies_is_one_line(tmp_path, monkeypatch):
    src = tmp_path / "src"
    small_tree(src / "train")
    real = conv.load_rgb

    def killed_on_the_last(path, max_side=None):  # what the out-of-memory killer does to a worker
        if str(path).endswith("n02/plain_1.JPEG"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, max_side)

    monkeypatch.setattr(conv, "load_rgb", killed_on_the_last)  # the pool's forked workers inherit it
    with pytest.raises(ConversionError, match=r"^a process checking the images died \(out of memory\? killed\?\)"):
        convert(src, tmp_path / "out", ("train",), ConvertOptions(workers=2))
