"""Loading weights: every format the official releases use, strictly, without executing code from the file."""

import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import mambavision_train  # noqa: F401
from mambavision_train import CheckpointError, load_pretrained


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return timm.create_model("mambavision_demo")


def fresh():
    torch.manual_seed(123)
    return timm.create_model("mambavision_demo")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ema_of(model):
    return {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def checkpoint_saver_dict(model):
    """What timm's CheckpointSaver writes (the official training script's format)."""
    return {"epoch": 12, "arch": "mamba_vision_T", "state_dict": model.state_dict(), "state_dict_ema": ema_of(model),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.005, "weight_decay": 0.05, "params": [0]}]},
            "version": 2, "args": argparse.Namespace(model="mamba_vision_T", lr=0.005, batch_size=128, mesa=0.5),
            "metric": 82.24, "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0}}


def test_official_pth_tar_plain_and_ema(source, tmp_path):
    path = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save(checkpoint_saver_dict(source), path)
    assert same_weights(load_pretrained(fresh(), path), source)  # default: 'state_dict', as the official loader
    ema = load_pretrained(fresh(), path, ema=True).state_dict()
    assert all(torch.equal(ema[k], v) for k, v in ema_of(source).items())


def test_ema_requested_but_absent(source, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    with pytest.raises(CheckpointError, match="EMA weights requested but the checkpoint has none"):
        load_pretrained(fresh(), path, ema=True)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_plain_state_dicts_with_wrapper_prefixes(source, tmp_path, prefix):
    path = tmp_path / "weights.pth"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    assert same_weights(load_pretrained(fresh(), path), source)


def test_safetensors_with_the_hf_wrapper_prefix(source, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert same_weights(load_pretrained(fresh(), path), source)


def test_mismatch_is_one_clear_error(tmp_path):
    other = timm.create_model("mambavision_demo", num_classes=7, depths=[1, 1, 2, 3])
    path = tmp_path / "other.pth"
    sd = other.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(fresh(), path)
    msg = str(err.value)
    own = fresh().state_dict()
    n_unexpected = len([k for k in sd if k not in own])
    assert "\n" not in msg
    assert msg.startswith("checkpoint does not match MambaVision: missing 4: levels.3.blocks.1.mixer.qkv.weight, ")
    assert f"; unexpected {n_unexpected}: levels.3.blocks.1.mixer.A_log, " in msg
    assert "; wrong shape 2: head.weight (7, 256) vs model (10, 256), head.bias (7,) vs model (10,)" in msg
    model = fresh()
    load_pretrained(model, path, strict=False)  # non-strict loads what fits
    assert torch.equal(model.state_dict()["patch_embed.conv_down.0.weight"], sd["patch_embed.conv_down.0.weight"])


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_never_executes(source, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": source.state_dict(), "args": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*weights_only=True"):
        load_pretrained(fresh(), path)
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(fresh(), bad)
    with pytest.raises(CheckpointError, match="checkpoint not found: /no/such/file.pth"):
        load_pretrained(fresh(), "/no/such/file.pth")
    dcp = tmp_path / "last.dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a sharded \\(FSDP2\\) checkpoint"):
        load_pretrained(fresh(), dcp)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="is the index of a sharded checkpoint"):
        load_pretrained(fresh(), index)


def test_hugging_face_repo_from_a_local_cache(source, tmp_path):
    """The download path, fed by a Hugging Face cache laid out on disk (no network here): repo id, hf-hub:
    prefix and timm's pretrained=True all resolve through huggingface_hub."""
    repo = tmp_path / "hub" / "models--nvidia--MambaVision-T-1K"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.manual_seed(0)
    tiny = timm.create_model("mambavision_t")
    torch.save(checkpoint_saver_dict(tiny), snap / "mambavision_tiny_1k.pth.tar")
    torch.save(tiny.state_dict(), tmp_path / "expected.pth")
    code = f"""
import timm, torch, mambavision_train
from mambavision_train import load_pretrained
want = torch.load({str(tmp_path / 'expected.pth')!r})
for model in (load_pretrained(timm.create_model('mambavision_t'), 'nvidia/MambaVision-T-1K'),
              load_pretrained(timm.create_model('mambavision_t'), 'hf-hub:nvidia/MambaVision-T-1K'),
              load_pretrained(timm.create_model('mambavision_t'), 'nvidia/MambaVision-T-1K@{commit}'),
              timm.create_model('mambavision_t', pretrained=True)):
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
try:
    load_pretrained(timm.create_model('mambavision_s'), 'nvidia/MambaVision-S-1K')
except Exception as e:
    print('S:', type(e).__name__, e)
print('ok')
"""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout
    assert "S: CheckpointError could not get mambavision_small_1k.pth.tar from Hugging Face repo nvidia/MambaVision-S-1K" in res.stdout


def test_pretrained_for_another_class_count_loads_all_but_the_classifier_and_says_so(tmp_path, caplog):
    """timm's idiom, create_model(name, pretrained=True, num_classes=N): everything but the classifier is loaded,
    strictly, and one line says the classifier is new; for the weights' own class count the classifier loads too."""
    torch.manual_seed(0)
    source = timm.create_model("mambavision_demo").state_dict()
    path = tmp_path / "w.pth"
    torch.save(source, path)
    with caplog.at_level("WARNING"):
        model = timm.create_model("mambavision_demo", pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    assert [r.getMessage() for r in caplog.records] == [
        f"mambavision_demo: loaded {path} except its classifier (10 classes), which is new for 3 classes"]
    got = model.state_dict()
    assert got["head.weight"].shape == (3, 256) and not torch.equal(got["head.weight"][:3], source["head.weight"][:3])
    assert all(torch.equal(got[k], v) for k, v in source.items() if not k.startswith("head."))
    caplog.clear()
    same = timm.create_model("mambavision_demo", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(same.state_dict()["head.weight"], source["head.weight"]) and not caplog.records
    del source["levels.3.blocks.1.mlp.fc2.bias"]
    torch.save(source, path)
    with pytest.raises(CheckpointError, match=r"missing 1: levels\.3\.blocks\.1\.mlp\.fc2\.bias"):
        timm.create_model("mambavision_demo", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path)))
