"""The policy registry: every registered policy builds from its settings' defaults and runs; every setting a user
can type is checked and named by its key; the config's defaults are the settings dataclasses'; an unknown name and
what a policy needs of the model are refused before any model time."""

import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tiny_models import Sample, build_batch, build_model
from transformers import SiglipVisionConfig

from dyvte import VisualExit, cli
from dyvte.configs import ConfigError, check_infer_config
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import KeepRateSchedule
from dyvte.policies.pruners import AutoPruneSettings
from dyvte.policies.registry import (
    INPUT_SELECTOR,
    POLICY_NAMES,
    REGISTRY,
    PolicySettings,
    build_policy,
    check_composition,
)
from dyvte.preflight import check_infer_inputs

ROOT = Path(__file__).resolve().parent.parent
L = 4
cli.register_resolvers()


def compose_infer(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("infer", overrides=list(overrides))


def test_every_registered_policy_builds_from_its_defaults_and_runs():
    """AutoPrune's default budget (192 of 576) is out of its reach on 4 layers (layers 0 and 1 alone spend more), so
    it is refused there, naming the reason, and runs at a share it reaches."""
    model = build_model("llava", num_layers=L, seed=1)
    engine = VisualExit(model)
    batch = build_batch(model, [Sample(left_pad=2), Sample(text_after=9)])
    text = model.config.get_text_config(decoder=True)
    settings = PolicySettings(heads=ExitHeads(ExitHeadsConfig(text.hidden_size, L, 8)), vtw_layer=2, model=model,
                              gsearch=KeepRateSchedule([1.0, 1.0, 0.5, 0.5]), psigmoid=KeepRateSchedule([1.0] * L))
    with pytest.raises(ValueError, match="AutoPrune: sample 0 has 16 visual tokens, and share = 0.33.* is out of "
                                         "reach for it: layer 0 computes all 16 visual tokens"):
        engine.prefill(**batch, policy=build_policy("autoprune", settings))
    settings.options["autoprune"] = AutoPruneSettings(share=0.75)
    full = engine.prefill(**batch)
    for name in POLICY_NAMES:
        out = engine.prefill(**batch, policy=build_policy(name, settings))
        assert out.logits.shape == full.logits.shape and torch.isfinite(out.logits).all(), name
    assert torch.equal(engine.prefill(**batch, policy=build_policy("none", settings)).logits, full.logits)


def test_every_setting_a_user_types_is_checked_and_named_by_its_key():
    for spec in REGISTRY.values():
        for setting in fields(spec.settings) if spec.settings else ():
            if setting.name == "path":  # a file a search was saved to: read when used
                continue
            key = spec.key(setting.name)
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='x': "):
                check_infer_config(compose_infer("task=eval", f"{key}=x"))


def test_config_defaults_are_the_settings_dataclasses():
    cfg = compose_infer()
    for spec in REGISTRY.values():
        if spec.settings is None:
            continue
        defaults = asdict(spec.settings())
        configured = {key: cfg[key] for key in defaults} if spec.top_level else OmegaConf.to_object(cfg[spec.name])
        assert configured == {key: list(v) if isinstance(v, tuple) else v for key, v in defaults.items()}, spec.name


def test_compositions_of_two_input_selectors_or_two_exits_are_refused():
    selectors = [name for name, spec in REGISTRY.items() if spec.kind == INPUT_SELECTOR]
    for first in selectors:
        for second in selectors:
            if first != second:
                with pytest.raises(ValueError, match="both choose the visual tokens that enter the LLM"):
                    check_composition([first, second])
        check_composition([first, "dynamic"])
    with pytest.raises(ValueError, match="both decide the exit layer"):
        check_composition(["dynamic", "vtw"])


def save_config(model_config, folder: Path) -> Path:
    model_config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides, family, message", [
    (["policy=nope"], "llava", r"policy='nope': unknown policy nope; policies: " + re.escape(", ".join(POLICY_NAMES))),
    (["policy=visionzip+vispruner"], "llava", r"'visionzip' and 'vispruner' both choose the visual tokens"),
    (["policy=visionzip"], "qwen2_vl", r"policy 'visionzip' runs on model_type llava only; .* is 'qwen2_vl'"),
    (["policy=vispruner"], "siglip", (r"policy 'vispruner' needs a vision tower of model_type clip_vision_model; "
                                      r".* has 'siglip_vision_model'")),
    (["policy=pdrop", "pdrop.layers=[1,5]"], "llava", (r"pdrop.layers=\[1, 5\]: must be increasing stage "
                                                       r"boundaries in \[1, 3\] \(the model has num_hidden_layers=4\)")),
    (["policy=sparsevlm", "sparsevlm.layers=[0,1,3]"], "llava", (r"sparsevlm.layers=\[0, 1, 3\]: must be "
                                                                 r"increasing layers in \[0, 2\]")),
    (["policy=autoprune"], "qwen2_vl", r"policy 'autoprune' runs on model_type llava only; .* is 'qwen2_vl'"),
    (["policy=autoprune"], "siglip", r"policy 'autoprune' needs a vision tower of model_type clip_vision_model"),
    (["policy=autoprune"], "llava", (r"autoprune.share=0.333.*: is out of AutoPrune's reach on this model \(576 "
                                     r"visual tokens per image, num_hidden_layers=4\): layer 0 computes all 576")),
])
def test_what_a_policy_needs_of_the_model_is_refused_before_it_loads(tmp_path, overrides, family, message):
    model_config = build_model("qwen2_vl" if family == "qwen2_vl" else "llava", num_layers=L).config
    if family == "siglip":
        model_config.vision_config = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=16, patch_size=4)
    folder = save_config(model_config, tmp_path / family)
    cfg = compose_infer(f"model.name_or_path={folder}", "question=q", *overrides)
    check_infer_config(cfg)
    with pytest.raises(ConfigError, match=message):
        check_infer_inputs(cfg)
