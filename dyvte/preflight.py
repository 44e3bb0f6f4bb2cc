"""Checks that read the filesystem, run at start-up before any model time (`dyvte.configs` checks the values).

Everything a run will need and that can be looked at without loading weights is looked at here: the model folder
and its config's depth (`AutoConfig`, no weights), the data files (parsed), the image, the heads folder, the policy
names and layers, and the label caches a run without the labels stage reads. Each problem is a `ConfigError` that
names the key, the value and the fix; a damaged label cache is a `CacheError` that names the file and the repair.
"""

from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig

from .configs import ConfigError, policy_options
from .data import DataFileError, Sample, load_splits
from .loading import resolve_model_path
from .policies.registry import POLICY_NAMES, REGISTRY, check_composition, needs_heads, nominal_visual_tokens
from .policies.settings import SettingError


def _is_hub_id(value: str) -> bool:
    if value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_model_path(cfg) -> Path | str:
    """`model.name_or_path` is `testbed`, a checkpoint folder with a config.json, or a well-formed Hub id; returns
    what `from_pretrained` will be given."""
    name = str(cfg.model.name_or_path)
    try:
        resolved = resolve_model_path(name)
    except FileNotFoundError as error:
        raise ConfigError(f"model.name_or_path={name!r}: {error}") from None
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name!r}: the folder has no config.json, so it is not a checkpoint; "
                              "give a folder written by save_pretrained, a Hub id or `testbed`")
        return path
    if path.exists():
        raise ConfigError(f"model.name_or_path={name!r} is a file; give the checkpoint's folder")
    if not _is_hub_id(name):
        raise ConfigError(f"model.name_or_path={name!r}: no such folder, and not a Hub id (org/name); give an "
                          "existing checkpoint folder, a Hub id or `testbed`")
    return name


def model_config(cfg, model_path: Path | str):
    """The model's config alone (`AutoConfig`, no weights)."""
    try:
        return AutoConfig.from_pretrained(str(model_path), revision=cfg.model.revision)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r}: its config cannot be read "
                          f"({error})") from None


def model_num_layers(cfg, model_path: Path | str) -> int:
    """The decoder's `num_hidden_layers`, read from the model's config alone (no weights)."""
    return model_config(cfg, model_path).get_text_config(decoder=True).num_hidden_layers


def check_heads_path(cfg) -> None:
    """`heads` is a folder of exit heads (config.json + model.safetensors) or a well-formed Hub id."""
    heads = str(cfg.heads)
    path = Path(heads).expanduser()
    if path.is_dir():
        missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"heads={heads!r}: the folder lacks {' and '.join(missing)}, so it holds no exit heads; "
                              "give a train.py run's heads/ folder")
    elif path.exists():
        raise ConfigError(f"heads={heads!r} is a file; give the heads folder (a train.py run's heads/)")
    elif not _is_hub_id(heads):
        raise ConfigError(f"heads={heads!r}: no such folder, and not a Hub id (org/name); give a train.py run's "
                          "heads/ folder or a Hub id")


def check_data_paths(cfg) -> None:
    """The data files exist and are files, the image folder a folder (llava_json sources)."""
    data = cfg.data
    if data.source != "llava_json":
        return
    for key in ("json_path", "val_json_path", "test_json_path", "certification_json_path"):
        value = getattr(data, key)
        if value and not Path(value).is_file():
            state = "is a folder" if Path(value).is_dir() else "does not exist"
            raise ConfigError(f"data.{key}={value!r} {state}; give the LLaVA instruction JSON file")
    if not Path(data.image_dir).is_dir():
        raise ConfigError(f"data.image_dir={data.image_dir!r} is not a folder; give the folder the records' image "
                          "paths are relative to")


def read_splits(cfg) -> dict[str, list[Sample]]:
    """`load_splits(cfg.data)`, with a file that cannot be parsed named (file, line, column) as a ConfigError."""
    check_data_paths(cfg)
    try:
        return load_splits(cfg.data)
    except DataFileError as error:
        raise ConfigError(f"data: {error}; fix the file or point data.* at another") from None


def check_train_inputs(settings) -> dict[str, list[Sample]]:
    """Everything `train.py` reads before it loads the model (`settings`: its `TrainSettings`); returns the data
    splits (parsed once)."""
    model_path = check_model_path(settings)
    num_layers = model_num_layers(settings, model_path)
    layers = settings.labels.layers
    if isinstance(layers, list):
        outside = [k for k in layers if not 0 <= k <= num_layers]
        if outside:
            raise ConfigError(f"labels.layers={list(layers)}: exit layers {outside} are outside [0, {num_layers}] "
                              f"(the model has num_hidden_layers={num_layers})")
    if "validate" in settings.stages and "heads" not in settings.stages:
        check_heads_path(settings)
    splits = read_splits(settings)
    if "labels" not in settings.stages:
        check_label_caches(settings, splits)
    return splits


def check_label_caches(settings, splits: dict[str, list[Sample]]) -> None:
    """A run without the labels stage reads every split's label cache (`settings`: the run's `TrainSettings`):
    each must exist, be complete and verify."""
    from .training.pipeline import label_stores  # the training stack, only for train.py

    for name, store in label_stores(settings, None, None, splits, compute=False).items():
        if not store.complete:
            state = "is incomplete" if store.dir.exists() else "does not exist"
            raise ConfigError(f"stages={settings.stages} reads the {name} label cache {store.dir}, which {state}: "
                              "add the labels stage (e.g. stages=[labels,heads,validate])")
        store.verify()


def policy_names(cfg) -> list[str]:
    return [cfg.policy] if cfg.task == "sample" else list(cfg.policies)


def check_policy_names(names: list[str], key: str) -> set[str]:
    """The policy names of config key `key` are registered policies, or `+` compositions of them whose parts agree
    (`check_composition`); returns the parts."""
    shown = f"{key}={list(names) if key == 'policies' else names[0]!r}"
    parts = {part for name in names for part in str(name).split("+")}
    unknown = sorted(parts - set(POLICY_NAMES))
    if unknown:
        raise ConfigError(f"{shown}: unknown policy {', '.join(unknown)}; policies: {', '.join(POLICY_NAMES)} and "
                          "'+' compositions")
    for name in names:
        try:
            check_composition(str(name).split("+"))
        except ValueError as error:
            raise ConfigError(f"{shown}: {error}") from None
    return parts


def check_policy_needs(cfg, parts: set[str], config) -> None:
    """What the policies named (`parts`) need of the model, read from its config (`config`, no weights): their
    settings fit its depth (and, for a budget the method may not reach, its images' visual tokens), and it is a
    family and has a vision tower they run on."""
    num_layers = config.get_text_config(decoder=True).num_hidden_layers
    options = policy_options(cfg)
    tower = getattr(getattr(config, "vision_config", None), "model_type", None)
    for name in sorted(parts, key=POLICY_NAMES.index):
        spec, settings = REGISTRY[name], options.get(name)
        if hasattr(settings, "check_depth"):  # the settings whose rules depend on the depth
            try:
                settings.check_depth(num_layers)
            except SettingError as error:
                raise ConfigError(f"{spec.key(error.name)}={error.value!r}: {error.expected}") from None
        if spec.needs.families is not None and config.model_type not in spec.needs.families:
            raise ConfigError(f"policy {name!r} runs on model_type {', '.join(spec.needs.families)} only; "
                              f"model.name_or_path={cfg.model.name_or_path!r} is {config.model_type!r}: pick another "
                              "policy or model")
        if spec.needs.towers is not None and tower not in spec.needs.towers:
            raise ConfigError(f"policy {name!r} needs a vision tower of model_type {', '.join(spec.needs.towers)}; "
                              f"model.name_or_path={cfg.model.name_or_path!r} has {tower!r}: pick another policy or "
                              "model")
        if hasattr(settings, "check_reach"):  # a budget the method meets only on some depths and image sizes
            try:
                settings.check_reach(num_layers, nominal_visual_tokens(config))
            except SettingError as error:
                raise ConfigError(f"{spec.key(error.name)}={error.value!r}: {error.expected}") from None


def check_infer_inputs(cfg) -> dict[str, list[Sample]] | None:
    """Everything `infer.py` reads before it loads the model; returns the data splits for task=eval."""
    names = policy_names(cfg)
    parts = check_policy_names(names, "policy" if cfg.task == "sample" else "policies")
    check_policy_needs(cfg, parts, model_config(cfg, check_model_path(cfg)))
    if any(needs_heads(name) for name in names):
        check_heads_path(cfg)
    if cfg.task == "sample":
        if cfg.image is not None:
            image = Path(cfg.image)
            if not image.is_file():
                state = "is a folder" if image.is_dir() else "does not exist"
                raise ConfigError(f"image={cfg.image!r} {state}; give an image file")
        return None
    return read_splits(cfg)
