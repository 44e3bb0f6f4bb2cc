"""ExitHeads as a Hub model: saved, reloaded, pushed to a Hub-like local folder and loaded back by repo id."""

import json
import shutil
from pathlib import Path

import huggingface_hub.hub_mixin
import pytest
import torch
from safetensors.torch import load_file

import dyvte.heads
from dyvte.heads import ExitHeads, ExitHeadsConfig


def trained_like_heads() -> ExitHeads:
    torch.manual_seed(0)
    heads = ExitHeads(ExitHeadsConfig(8, 3, 4, feature_span="all_text", model="testbed", revision="main",
                                      labels={"alpha": 1.03}))
    heads.calibrate(0.93, (0.9, 0.95, 0.93))  # what train.py's validate stage does before saving
    return heads


def assert_same(a: ExitHeads, b: ExitHeads) -> None:
    assert a.config == b.config
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_save_and_reload(tmp_path):
    heads = trained_like_heads()
    heads.save_pretrained(tmp_path / "heads")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["threshold"] == 0.93 and config["head_hidden"] == 4 and config["feature_span"] == "all_text"
    assert load_file(str(tmp_path / "heads" / "model.safetensors")).keys() == heads.state_dict().keys()
    reloaded = ExitHeads.from_pretrained(tmp_path / "heads")
    assert_same(heads, reloaded)
    assert reloaded.threshold == 0.93 and not reloaded.training
    assert [reloaded.layer_threshold(i) for i in range(3)] == [0.9, 0.95, 0.93]


def test_calibrate_checks_what_it_records():
    heads = trained_like_heads()
    with pytest.raises(ValueError, match="one value per head"):
        heads.calibrate(0.5, (0.5, 0.5))
    assert heads.config.threshold == 0.93 and heads.config.thresholds == (0.9, 0.95, 0.93)  # left as it was
    heads.calibrate(0.7)
    assert heads.config.thresholds is None and [heads.layer_threshold(i) for i in range(3)] == [0.7] * 3


def test_reload_is_strict_and_names_missing_files(tmp_path):
    trained_like_heads().save_pretrained(tmp_path / "heads")
    with pytest.raises(FileNotFoundError, match="holds no exit heads"):
        ExitHeads.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    (tmp_path / "heads" / "config.json").write_text(json.dumps({**config, "head_hidden": 5}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        ExitHeads.from_pretrained(tmp_path / "heads")


class LocalHub:
    """Stands in for the Hub: `upload_folder` copies the pushed folder to `root/<repo_id>`, and downloads read
    from there."""

    def __init__(self, root: Path):
        self.root = root

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False):
                (hub.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
                return type("RepoUrl", (), {"repo_id": repo_id})()

            def upload_folder(self, repo_id, folder_path, **kwargs):
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
                return f"local://{repo_id}"

        return Api()

    def download(self, repo_id, filename, **kwargs):
        path = self.root / repo_id / filename
        if not path.exists():
            raise FileNotFoundError(path)
        return str(path)


def test_push_to_hub_and_load_by_repo_id(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", hub.api)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", hub.download)
    monkeypatch.setattr(dyvte.heads, "hf_hub_download", hub.download)
    heads = trained_like_heads()
    assert heads.push_to_hub("user/testbed-heads") == "local://user/testbed-heads"
    pushed = sorted(p.name for p in (tmp_path / "hub" / "user" / "testbed-heads").iterdir())
    assert pushed == ["README.md", "config.json", "model.safetensors"]
    assert "dyvte" in (tmp_path / "hub" / "user" / "testbed-heads" / "README.md").read_text()  # the model card
    assert_same(heads, ExitHeads.from_pretrained("user/testbed-heads"))
