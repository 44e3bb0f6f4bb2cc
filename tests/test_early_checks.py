"""Faults found before any model time, model identity over every weight format, and bad records as bad samples.

The start-up checks run in this process (`dyvte.preflight` is what train.py / infer.py call before loading the
model); the references are hashlib over the files' bytes and PIL's own decompression-bomb check.
"""

import hashlib
import json
import struct
import zlib
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed, tiny_testbed
from hydra import compose, initialize_config_dir
from PIL import Image

from dyvte import cli
from dyvte.configs import ConfigError, check_infer_config, check_train_config, read_train_settings
from dyvte.data import BadSample, PromptCollator, Sample, read_llava_json
from dyvte.evaluation.compare import PolicySettings, build_policy
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.loading import model_identity
from dyvte.preflight import check_infer_inputs, check_train_inputs
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR
from dyvte.testbed import MODEL_DIR as TESTBED_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
cli.register_resolvers()


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, processor = save_tiny_testbed(path)
    return model, processor, path


def concatenated_sha256(files: list[Path]) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


# ---- model identity -------------------------------------------------------------------------------------------

def test_identity_covers_bin_checkpoints(tiny_model, tmp_path):
    """Two different checkpoints saved as pytorch_model.bin: different identities (before: both the sha256 of
    nothing), and heads trained on one are refused for the other."""
    model, _, _ = tiny_model
    for name, shift in (("a", 0.0), ("b", 1.0)):  # a PyTorch-pickle checkpoint, as older Hub repositories hold
        (tmp_path / name).mkdir()
        model.config.save_pretrained(tmp_path / name)
        state = {k: v + shift if k == "lm_head.weight" else v for k, v in model.state_dict().items()}
        torch.save(state, tmp_path / name / "pytorch_model.bin")
    a, b = (model_identity(str(tmp_path / name), None)["weights_sha256"] for name in "ab")
    assert a == concatenated_sha256([tmp_path / "a" / "pytorch_model.bin"])
    assert b == concatenated_sha256([tmp_path / "b" / "pytorch_model.bin"])
    assert a != b != hashlib.sha256().hexdigest()
    heads = ExitHeads(ExitHeadsConfig(32, 3, 8, model=str(tmp_path / "a"), weights_sha256=a))
    heads.check_fits(model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="train the heads again"):
        heads.check_fits(model, str(tmp_path / "b"))


def test_identity_covers_sharded_checkpoints_and_is_streamed_once(tiny_model, tmp_path):
    model, _, _ = tiny_model
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({tmp_path / name for name in index["weight_map"].values()})
    assert len(shards) > 1
    real_open = open
    with mock.patch("builtins.open", side_effect=real_open) as opened:
        first = model_identity(str(tmp_path), None)["weights_sha256"]
        second = model_identity(str(tmp_path), None)["weights_sha256"]
    weight_reads = [c for c in opened.call_args_list
                    if isinstance(c.args[0], (str, Path)) and Path(c.args[0]) in shards]
    assert first == second == concatenated_sha256(shards)
    assert len(weight_reads) == len(shards)  # each file read once, by the first call; the second is remembered
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"names weight shards that are not in .*{shards[-1].name}"):
        model_identity(str(tmp_path), None)


def test_identity_of_a_hub_id_is_its_cached_commit(tmp_path, monkeypatch):
    """A Hub id resolves its revision to the commit in the local Hub cache; heads trained at another commit are
    refused."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--mllm"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    assert model_identity("org/mllm", "main") == {"model": "org/mllm", "revision": "main", "commit": "b" * 40}
    assert model_identity("org/other", "main") == {"model": "org/other", "revision": "main"}  # not cached
    model, _ = tiny_testbed()
    heads = ExitHeads(ExitHeadsConfig(32, 3, 8, model="org/mllm", revision="main", commit="a" * 40))
    with pytest.raises(ValueError, match="trained on commit aaaaaaaaaaaa .* resolves to commit bbbbbbbbbbbb"):
        heads.check_fits(model, "org/mllm", "main")


def test_shipped_heads_still_fit_the_shipped_model():
    """The digest of a safetensors-only folder is the one recorded before (the shipped heads carry it)."""
    shipped = json.loads((TESTBED_DATA_DIR / "heads" / "config.json").read_text())["weights_sha256"]
    assert model_identity("testbed", None)["weights_sha256"] == shipped
    assert shipped == concatenated_sha256(sorted(TESTBED_MODEL_DIR.glob("*.safetensors")))


# ---- bad records ---------------------------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its data is one pixel): PIL refuses it on the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + \
        chunk(b"IEND", b"")


def test_malformed_records_and_bombs_are_listed_bad_samples(tiny_model, tmp_path):
    _, processor, _ = tiny_model
    Image.new("RGB", (96, 96), "white").save(tmp_path / "ok.png")
    (tmp_path / "bomb.png").write_bytes(png_claiming(20000, 10000))
    with pytest.raises(Image.DecompressionBombError):  # the reference: PIL's own limit refuses it
        Image.open(tmp_path / "bomb.png")
    turn = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    records = [
        {"id": "ok", "image": "ok.png", "conversations": turn},
        {"id": "no-value", "image": "ok.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        {"id": "string-conversations", "image": "ok.png", "conversations": "hello"},
        {"id": "numeric-image", "image": 7, "conversations": turn},
        {},
        ["not", "a", "record"],
        {"id": "bomb", "image": "bomb.png", "conversations": turn},
        {"id": "folder", "image": ".", "conversations": turn},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples = read_llava_json(tmp_path / "data.json", tmp_path)
    batch = PromptCollator(processor)(samples)
    assert [s.id for s in batch["samples"]] == ["ok"]
    reasons = {s["id"]: s["reason"] for s in batch["skipped"]}
    assert reasons == {
        "no-value": f"turn 0 of the conversation has no string 'value' (record 1 of {tmp_path / 'data.json'})",
        "string-conversations": f"conversations is a str, not a list of turns (record 2 of {tmp_path / 'data.json'})",
        "numeric-image": f"image must be a path, got the int 7 (record 3 of {tmp_path / 'data.json'})",
        "record 4": f"conversations is missing, not a list of turns (record 4 of {tmp_path / 'data.json'})",
        "record 5": f"the record is a JSON list, not an object (record 5 of {tmp_path / 'data.json'})",
        "bomb": "image is 20000x10000 = 200000000 pixels, over data.max_image_pixels=89478485 (raise it if the "
                f"image is genuine): {tmp_path / 'bomb.png'}",
        "folder": f"image is a folder, not an image file: {tmp_path}",
    }
    small = PromptCollator(processor, max_image_pixels=96 * 96 - 1)([samples[0]])  # the limit is the config's
    assert small["skipped"][0]["reason"].startswith("image is 96x96 = 9216 pixels, over data.max_image_pixels=9215")
    with pytest.raises(BadSample, match="sample 'bomb': image is 20000x10000"):
        PromptCollator(processor, on_bad_sample="raise")(samples[6:7])


def test_any_error_of_one_record_is_its_bad_sample(tiny_model):
    """An unforeseen exception while reading one sample (here a decoder's) skips that sample, named."""
    _, processor, _ = tiny_model
    samples = [Sample(id=name, image=Image.new("RGB", (96, 96)), question="<image>\nq", answer="a")
               for name in ("fine", "broken")]
    real_convert = Image.Image.convert

    def convert(self, *args, **kwargs):
        if self is samples[1].image:
            raise MemoryError("decoder ran out")
        return real_convert(self, *args, **kwargs)

    with mock.patch.object(Image.Image, "convert", convert):
        batch = PromptCollator(processor)(samples)
    assert [s.id for s in batch["samples"]] == ["fine"]
    assert batch["skipped"] == [{"id": "broken", "reason": "cannot be read (MemoryError: decoder ran out)"}]


# ---- checks before model time --------------------------------------------------------------------------------

def train_config(model_path, *overrides):
    return compose_config("train", f"model.name_or_path={model_path}", *overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name_or_path=/no/such/checkpoint"], r"model.name_or_path='/no/such/checkpoint': no such folder"),
        (["labels.layers=[1,99]"], r"labels.layers=\[1, 99\]: exit layers \[99\] are outside \[0, 3\] \(the model "
                                   r"has num_hidden_layers=3\)"),
        (["stages=[validate]", "heads=/no/such/heads"], r"heads='/no/such/heads': no such folder"),
        (["data.json_path={tmp}"], r"data.json_path='.*' is a folder; give the LLaVA instruction JSON file"),
        (["data.json_path={tmp}/broken.json"], r"data: .*broken.json: invalid JSON at line 2 column 10 "
                                               r"\(character 11\)"),
        (["data.json_path={tmp}/object.json"], r"object.json: the top level is a JSON dict, not a list of records"),
        (["stages=[heads]", "cache_dir={tmp}/cache"], r"stages=\['heads'\] reads the train label cache .*, which "
                                                      r"does not exist: add the labels stage"),
    ],
)
def test_train_inputs_are_checked_before_the_model_loads(tiny_model, tmp_path, overrides, message):
    _, _, path = tiny_model
    (tmp_path / "broken.json").write_text('[\n  {"id": }\n]')
    (tmp_path / "object.json").write_text("{}")
    cfg = train_config(path, *(o.format(tmp=tmp_path) for o in overrides))
    check_train_config(cfg)
    with mock.patch("dyvte.loading.AutoModelForImageTextToText.from_pretrained") as load:
        with pytest.raises(ConfigError, match=message):
            check_train_inputs(read_train_settings(cfg))
    load.assert_not_called()
    assert not (tmp_path / "cache").exists()  # nothing left behind by a refused run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["policy=dynamc"], r"policy='dynamc': unknown policy dynamc; policies: none, vtw, fastv, dynamic"),
        (["task=eval", "policies=[none,fastv+nope]"], r"policies=\['none', 'fastv\+nope'\]: unknown policy nope"),
        (["policy=fastv", "fastv.layer=3"], r"fastv.layer=3: FastV prunes before a decoder layer in \[1, 2\]"),
        (["policy=vtw", "vtw.layer=4"], r"vtw.layer=4: the exit layer must be in \[0, 3\]"),
        (["image={tmp}"], r"image='.*' is a folder; give an image file"),
        (["heads={tmp}"], r"heads='.*': the folder lacks config.json and model.safetensors"),
    ],
)
def test_infer_inputs_are_checked_before_the_model_loads(tiny_model, tmp_path, overrides, message):
    _, _, path = tiny_model
    cfg = compose_config("infer", f"model.name_or_path={path}", "question=q",
                         *(o.format(tmp=tmp_path) for o in overrides))
    check_infer_config(cfg)
    with pytest.raises(ConfigError, match=message):
        check_infer_inputs(cfg)


def test_threshold_above_one_with_force_is_used(tiny_model):
    model, _, _ = tiny_model
    heads = ExitHeads(ExitHeadsConfig(32, 3, 8))
    check_infer_config(compose_config("infer", "question=q", "threshold=1.01", "force=true"))
    assert build_policy("dynamic", PolicySettings(heads=heads, threshold=1.01, force=True)).threshold == 1.01
    with pytest.raises(ValueError, match="pass force=True"):
        build_policy("dynamic", PolicySettings(heads=heads, threshold=1.01))


def test_logger_target_is_lightnings_unless_allowed():
    check_train_config(compose_config("train", "logger=tensorboard"))
    with pytest.raises(ConfigError, match=r"logger._target_='os.system': must be one of Lightning's loggers"):
        check_train_config(compose_config("train", "logger._target_=os.system"))
    with pytest.raises(ConfigError, match=r"logger.save_dir._target_='builtins.exec'"):
        check_train_config(compose_config("train", "logger.save_dir={_target_:builtins.exec}"))
    check_train_config(compose_config("train", "logger._target_=my_lab.loggers.Logger", "allow_any_logger=true"))
