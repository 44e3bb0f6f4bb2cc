"""Checks of the Hydra configs of `train.py`, `infer.py` and `analyze.py`, run at start-up before any model time,
the config nodes stored for Hydra (the schemas of the model and data groups and of train.py's sections,
`store_schemas`; the policies' settings, derived from the policy registry, `store_policy_settings`), and the typed
settings the entry points hand the library (`read_model_settings`, `read_data_settings`, `read_train_settings`).

Every value a user can set is checked here, and a bad one stops the run with a `ConfigError` that names the key,
the value and what it may be, instead of a torch error deep inside a stage. A policy's settings are checked by its
own settings dataclass (`dyvte.policies.registry`), worded by the key the user typed.
"""

from dataclasses import asdict, fields
from numbers import Integral, Real

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from .adapters.base import TEXT_SPANS, WITHDRAW_CHOICES
from .data import DataSettings
from .engine.features import FEATURE_GROUPS
from .evaluation.budget import BUDGET_BY
from .heads import ARCHITECTURES, INPUT_PARTS, LABEL_SHAPES, LABEL_TARGETS
from .loading import ATTENTION_CHOICES, DTYPE_CHOICES, QUANTIZATION_CHOICES, ModelSettings
from .policies.registry import BUDGET_METHODS, EXIT, REGISTRY, PolicySpec
from .policies.settings import SettingError
from .training.settings import FeatureSettings, HeadTrainingSettings, LabelSettings, TrainSettings, ValidateSettings

STAGES = ("labels", "heads", "validate")
DATA_SOURCES = ("llava_json", "hf")
GROUP_KEYS = ("family",)  # sample fields `validate.groups` can certify within


class ConfigError(ValueError):
    """A config value that cannot work, named with its key."""


def _fail(key: str, value, expected: str):
    raise ConfigError(f"{key}={value!r}: {expected}")


def _integer(cfg, key: str, minimum: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        _fail(key, value, f"must be an integer >= {minimum}" + (" (or null)" if optional else ""))


def _number(cfg, key: str, low: float, high: float, low_open: bool = False, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(key, value, "must be a number" + (" (or null)" if optional else ""))
    if not (low < value if low_open else low <= value) or value > high:
        _fail(key, value, f"must be in {'(' if low_open else '['}{low}, {high}]")


def _choice(cfg, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        _fail(key, value, "must be one of " + ", ".join("null" if c is None else str(c) for c in choices))


def _given(cfg, key: str, hint: str) -> None:
    if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) in (None, ""):
        raise ConfigError(f"{key} is not set: {hint}")


def check_model(cfg: DictConfig) -> None:
    _given(cfg, "model.name_or_path", "give a Hugging Face id, a local checkpoint folder or `testbed`")
    _choice(cfg, "model.dtype", DTYPE_CHOICES)
    _choice(cfg, "model.attn_implementation", ATTENTION_CHOICES)
    _choice(cfg, "model.quantization", QUANTIZATION_CHOICES)
    _number(cfg, "model.llm_int8_threshold", 0.0, float("inf"))
    _choice(cfg, "model.withdraw", WITHDRAW_CHOICES)


def read_model_settings(cfg: DictConfig) -> ModelSettings:
    """The composed config's `model` group as the `ModelSettings` the entry points load the model from."""
    return OmegaConf.to_object(OmegaConf.merge(ModelSettings, cfg.model))


def read_data_settings(cfg: DictConfig) -> DataSettings:
    """The composed config's `data` group as the `DataSettings` `dyvte.data.load_splits` reads."""
    return OmegaConf.to_object(OmegaConf.merge(DataSettings, cfg.data))


def read_train_settings(cfg: DictConfig) -> TrainSettings:
    """A composed `conf/train.yaml`, checked (`check_train_config`), as the `TrainSettings` the stages take. The
    logger's config stays unresolved: its `${hydra:runtime.output_dir}` resolves when the run builds the logger."""
    sections = {name: OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.to_container(cfg[name], resolve=True)))
                for name, schema in SCHEMAS.items()}  # resolved in place: their interpolations name other sections
    return TrainSettings(
        **sections, trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
        logger=OmegaConf.to_container(cfg.logger) if cfg.get("logger") is not None else None,
        stages=list(cfg.stages), heads=cfg.heads, seed=cfg.seed, cache_dir=str(cfg.cache_dir), verbose=cfg.verbose)


def check_data(cfg: DictConfig) -> None:
    _choice(cfg, "data.source", DATA_SOURCES)
    defaults, other = DataSettings(), "hf" if cfg.data.source == "llava_json" else "llava_json"
    for key in DataSettings.SOURCE_KEYS[other]:
        value = OmegaConf.select(cfg, f"data.{key}")
        if value != getattr(defaults, key):
            _fail(f"data.{key}", value, f"data.source={cfg.data.source} does not read it; remove it, or set the "
                  f"source's own keys ({', '.join(DataSettings.SOURCE_KEYS[cfg.data.source])})")
    if cfg.data.source == "llava_json":
        _given(cfg, "data.json_path", "the LLaVA instruction JSON (e.g. llava_v1_5_mix665k.json)")
        _given(cfg, "data.image_dir", "the folder the records' image paths are relative to")
    else:
        _given(cfg, "data.path", "a `datasets` source: a Hub id or a local dataset folder")
    _number(cfg, "data.fraction", 0.0, 1.0, low_open=True)
    _number(cfg, "data.val_fraction", 0.0, 0.99)
    _number(cfg, "data.certification_fraction", 0.0, 0.99)
    if cfg.data.val_fraction + cfg.data.certification_fraction >= 1:
        _fail("data.certification_fraction", cfg.data.certification_fraction, f"and data.val_fraction="
              f"{cfg.data.val_fraction} together hold out all the training data: their sum must be below 1")
    _integer(cfg, "data.limit", 1, optional=True)
    _integer(cfg, "data.eval_limit", 1, optional=True)
    _integer(cfg, "data.max_length", 1, optional=True)
    _choice(cfg, "data.on_bad_sample", ("skip", "raise"))
    _integer(cfg, "data.max_image_pixels", 1, optional=True)


def check_train_config(cfg: DictConfig) -> None:
    """Every key of `conf/train.yaml` (with its groups) that a user sets."""
    stages = cfg.stages
    if not isinstance(stages, (list, ListConfig)) or not stages or set(stages) - set(STAGES):
        _fail("stages", OmegaConf.to_object(stages) if isinstance(stages, ListConfig) else stages,
              f"must be a non-empty list of {', '.join(STAGES)}")
    _integer(cfg, "seed", 0)
    check_model(cfg)
    check_data(cfg)
    _choice(cfg, "labels.reference", ("model", "ground_truth"))
    _number(cfg, "labels.alpha", 0.0, float("inf"), low_open=True)
    layers = cfg.labels.layers
    if isinstance(layers, ListConfig):
        if not layers or not all(isinstance(k, Integral) and not isinstance(k, bool) and k >= 0 for k in layers):
            _fail("labels.layers", OmegaConf.to_object(layers), "must be all, random or a list of exit layers >= 0")
    elif layers not in ("all", "random"):
        _fail("labels.layers", layers, "must be all, random or a list of exit layers")
    _integer(cfg, "labels.max_new_tokens", 1)
    _integer(cfg, "labels.batch_size", 1)
    _integer(cfg, "labels.shard_size", 1)
    _choice(cfg, "features.span", TEXT_SPANS)
    groups = list(cfg.features.groups)
    if "text" not in groups or set(groups) - set(FEATURE_GROUPS):
        _fail("features.groups", groups, f"must hold text and only {', '.join(FEATURE_GROUPS)}")
    inputs = list(cfg.head_training.inputs)
    if not inputs or set(inputs) - set(INPUT_PARTS) or len(set(inputs)) != len(inputs):
        _fail("head_training.inputs", inputs, f"must be distinct parts of {', '.join(INPUT_PARTS)}")
    needed = {INPUT_PARTS[part][0] for part in inputs} - set(groups)
    if needed:
        _fail("head_training.inputs", inputs, f"read feature groups {sorted(needed)}: add them to features.groups")
    _choice(cfg, "head_training.architecture", ARCHITECTURES)
    _choice(cfg, "head_training.label_shape", LABEL_SHAPES)
    _choice(cfg, "head_training.label_target", LABEL_TARGETS)
    _integer(cfg, "head_training.hidden", 1)
    _number(cfg, "head_training.lr", 0.0, float("inf"), low_open=True)
    _number(cfg, "head_training.weight_decay", 0.0, float("inf"))
    _integer(cfg, "head_training.epochs", 1)
    _integer(cfg, "head_training.batch_size", 1)
    weights = cfg.head_training.class_weights
    if weights is not None and (len(weights) != 2 or not all(isinstance(w, Real) and w > 0 for w in weights)):
        _fail("head_training.class_weights", OmegaConf.to_object(weights), "must be null or [w_stay, w_exit], both > 0")
    if cfg.validate.threshold != "auto":
        _number(cfg, "validate.threshold", 0.0, 1.0)
    _choice(cfg, "validate.decision", ("global", "per_layer"))
    if cfg.validate.decision == "per_layer" and cfg.validate.threshold != "auto":
        _fail("validate.decision", "per_layer", "calibrates one threshold per head: give validate.threshold=auto, or "
              "validate.decision=global for one fixed threshold")
    _number(cfg, "validate.min_agreement", 0.0, 1.0, low_open=True)
    _choice(cfg, "validate.calibration", ("val", "crossfit"))
    _integer(cfg, "validate.folds", 2)
    thresholds = cfg.validate.thresholds
    if not thresholds or not all(isinstance(t, Real) and 0.0 <= t <= 1.0 for t in thresholds):
        _fail("validate.thresholds", OmegaConf.to_object(thresholds), "must be a non-empty list of numbers in [0, 1]")
    _certification(cfg)
    check_logger(cfg)
    if "validate" in stages and "heads" not in stages and not cfg.heads:
        raise ConfigError(
            "stages without heads validate heads trained before: set heads=DIR (a train.py run's heads/ folder or "
            "a Hub id), or add the heads stage"
        )


def _open_unit(cfg, key: str, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
        _fail(key, value, "must be a number strictly between 0 and 1" + (" (or null)" if optional else ""))


def _certification(cfg) -> None:
    """The Learn-then-Test keys of `validate` (docs/design.md, "Certified thresholds")."""
    _open_unit(cfg, "validate.target_agreement", optional=True)
    _open_unit(cfg, "validate.confidence")
    groups = cfg.validate.groups
    if groups is not None and groups not in GROUP_KEYS:
        _fail("validate.groups", groups, "must be null or one of " + ", ".join(GROUP_KEYS))
    if groups is not None and cfg.validate.target_agreement is None:
        _fail("validate.groups", groups, "certifies validate.target_agreement within each group: set "
              "validate.target_agreement (e.g. 0.98)")
    if cfg.validate.target_agreement is not None and cfg.validate.threshold != "auto":
        _fail("validate.threshold", cfg.validate.threshold, "certified thresholds are calibrated: give "
              "validate.threshold=auto, or validate.target_agreement=null for a fixed threshold")


def check_certification(cfg: DictConfig, splits: dict) -> None:
    """Before model time, with the splits read: a certificate needs a certification split that the deployed heads
    never trained on (no sample id and no image shared with train, val or test), large enough to certify
    `validate.target_agreement` at `validate.confidence` at all (with no loss, n >= log(1 - confidence) /
    log(target) rows; per group with `validate.groups`), and a `validate.groups` key its samples carry. `splits`:
    name -> samples (`dyvte.data.load_splits`)."""
    target = cfg.validate.target_agreement
    if target is None or "validate" not in cfg.stages:
        return
    from .data import image_key
    from .training.certify import min_certification_size  # the training stack, only when certifying

    certification = splits.get("certification") or []
    where = ("data.certification_split=SPLIT" if cfg.data.source == "hf" else "data.certification_json_path=FILE")
    if not certification:
        raise ConfigError(
            f"validate.target_agreement={target} certifies on rows the deployed heads never trained on, and the data "
            f"has no certification split: set {where}, or data.certification_fraction=0.2 to hold whole images out "
            "of the training data (the heads' own training rows, or the out-of-fold rows of validate.calibration="
            "crossfit, cannot certify them)")
    ids, images = {s.id for s in certification}, {image_key(s) for s in certification} - {""}
    for name in ("train", "val", "test"):
        shared_ids = sorted(ids & {s.id for s in splits.get(name) or []})
        shared_images = sorted(images & {image_key(s) for s in splits.get(name) or []})
        if shared_ids or shared_images:
            what = (f"{len(shared_ids)} sample ids (e.g. {shared_ids[0]!r})" if shared_ids else
                    f"{len(shared_images)} images (e.g. {shared_images[0]})")
            raise ConfigError(
                f"the certification split shares {what} with the {name} split: a certificate holds only for rows "
                f"the heads never trained on and the thresholds were not chosen on; give a certification split "
                f"disjoint from train, val and test ({where}, or data.certification_fraction)")
    minimum = min_certification_size(target, cfg.validate.confidence)
    key = cfg.validate.groups
    if key is not None and not all(getattr(s, key, "") for s in certification):
        raise ConfigError(f"validate.groups={key}: the certification samples do not all carry a {key} (set "
                          f"data.family_column for a datasets source), or use validate.groups=null")
    sizes = {"all": len(certification)}
    if key is not None:
        sizes = {}
        for sample in certification:
            sizes[getattr(sample, key)] = sizes.get(getattr(sample, key), 0) + 1
    if max(sizes.values()) < minimum:
        raise ConfigError(
            f"validate.target_agreement={target} at validate.confidence={cfg.validate.confidence} needs at least "
            f"{minimum} certification rows (log(1 - confidence) / log(target))"
            + (f" in some {key}" if key is not None else "") + ", and the certification split has "
            + (f"{len(certification)}" if key is None else ", ".join(f"{g}: {n}" for g, n in sorted(sizes.items())))
            + ": give a larger certification split, or lower the target or the confidence")


#: Where the `_target_` of `cfg.logger` may point unless `allow_any_logger=true`: Lightning's own loggers.
LOGGER_MODULES = ("lightning.pytorch.loggers.", "pytorch_lightning.loggers.")


def check_logger(cfg: DictConfig) -> None:
    """`instantiate(cfg.logger)` runs whatever `_target_` the config names, nested ones included. Only Lightning's
    loggers are allowed unless the user opts in with `allow_any_logger=true` (their own logger class)."""
    if cfg.get("allow_any_logger", False) or cfg.get("logger") is None:
        return
    targets = []

    def collect(node, key):  # unresolved: `${hydra:...}` values need no Hydra run to be checked
        if isinstance(node, dict):
            if "_target_" in node:
                targets.append((key, node["_target_"]))
            for child, value in node.items():
                collect(value, f"{key}.{child}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                collect(value, f"{key}[{index}]")

    collect(OmegaConf.to_container(cfg.logger, resolve=False), "logger")
    for key, target in targets:
        allowed = isinstance(target, str) and any(
            target.startswith(module) and "." not in target[len(module):] for module in LOGGER_MODULES)
        if not allowed:
            _fail(f"{key}._target_", target, "must be one of Lightning's loggers (lightning.pytorch.loggers.*); set "
                  "allow_any_logger=true to instantiate your own class (it runs the code the config names)")


def store_policy_settings() -> None:
    """Store the config node `policy_settings` that `conf/infer.yaml` (and so `conf/serve.yaml`) names in its
    defaults: one section per registered policy with its settings dataclass's defaults (`fastv.layer`, `tome.r`,
    ...), dynamic exit's at the top level (`threshold`, `force`), and `budget_methods` (every budget method). The
    values are plain, not typed by Hydra, so a check sees what the user typed (`check_policy_settings`)."""
    node = {}
    for spec in REGISTRY.values():
        if spec.settings is not None:
            defaults = asdict(spec.settings())
            if spec.top_level:
                node.update(defaults)
            else:
                node[spec.name] = defaults
    node["budget_methods"] = list(BUDGET_METHODS)
    ConfigStore.instance().store(name="policy_settings", node=node)


#: The schemas stored as `schema/<name>`: the model and data groups, and train.py's sections (`conf/*.yaml` list
#: them before their groups in `defaults`, so every config, a user's own too, is typed by them and gets their
#: defaults; a value of another type fails while the config is composed, and the checks below check the rest).
SCHEMAS = {"model": ModelSettings, "data": DataSettings, "head_training": HeadTrainingSettings,
           "labels": LabelSettings, "features": FeatureSettings, "validate": ValidateSettings}


def store_schemas() -> None:
    for name, schema in SCHEMAS.items():
        ConfigStore.instance().store(group="schema", name=name, node=schema)


# before any config is composed: every entry point and test composing one imports this module
store_policy_settings()
store_schemas()


def _policy_settings(cfg: DictConfig, spec: PolicySpec):
    """`spec`'s settings dataclass from its keys in `cfg`; a bad value is a `ConfigError` naming the key."""
    section = cfg if spec.top_level else cfg[spec.name]
    values = {setting.name: section[setting.name] for setting in fields(spec.settings)}
    values = {key: OmegaConf.to_object(value) if isinstance(value, (DictConfig, ListConfig)) else value
              for key, value in values.items()}
    try:
        return spec.settings(**values)
    except SettingError as error:
        raise ConfigError(f"{spec.key(error.name)}={error.value!r}: {error.expected}") from None


def policy_options(cfg: DictConfig) -> dict[str, object]:
    """Each registered policy's settings dataclass from its config section (`fastv.*`, `tome.*`, ...), by name
    (`PolicySettings.options`; dynamic exit's top-level `threshold` and `force` are `PolicySettings` fields)."""
    return {spec.name: _policy_settings(cfg, spec) for spec in REGISTRY.values()
            if spec.settings is not None and not spec.top_level}


def check_policy_settings(cfg: DictConfig) -> None:
    """Every registered policy's settings, by its settings dataclass's checks."""
    for spec in REGISTRY.values():
        if spec.settings is not None:
            _policy_settings(cfg, spec)


def check_budget(cfg: DictConfig) -> None:
    """The equal-budget comparison's keys of `conf/infer.yaml`."""
    _integer(cfg, "budget_unit", 1)
    _choice(cfg, "budget_by", BUDGET_BY)
    _integer(cfg, "budget_calibration", 1)
    budgets = cfg.budget
    if budgets is not None and (not isinstance(budgets, ListConfig) or not budgets or not all(
            isinstance(b, Real) and not isinstance(b, bool) and 0 < b <= cfg.budget_unit for b in budgets)):
        _fail("budget", OmegaConf.to_object(budgets) if isinstance(budgets, ListConfig) else budgets,
              f"must be null or a list of budgets in (0, budget_unit={cfg.budget_unit}]: no method keeps more "
              "visual tokens than the image has")
    methods = list(cfg.budget_methods)
    exits = [name for name in BUDGET_METHODS if REGISTRY[name].kind == EXIT]
    known = set(BUDGET_METHODS) | {f"{name}+dynamic" for name in BUDGET_METHODS if name not in exits}
    if not methods or set(methods) - known:
        _fail("budget_methods", methods, f"must be a non-empty list of {', '.join(BUDGET_METHODS)} (or one of them "
                                         f"but {' and '.join(exits)} composed with dynamic exit, e.g. "
                                         "cdpruner+dynamic)")


def check_infer_config(cfg: DictConfig) -> None:
    """Every key of `conf/infer.yaml` (with its groups) that a user sets."""
    _choice(cfg, "task", ("sample", "eval"))
    check_model(cfg)
    check_data(cfg)
    check_policy_settings(cfg)
    check_budget(cfg)
    _integer(cfg, "limit", 1, optional=True)
    _integer(cfg, "batch_size", 1)
    _integer(cfg, "max_new_tokens", 1)
    _integer(cfg, "seed", 0)
    thresholds = cfg.sweep_thresholds
    if not all(isinstance(t, Real) and 0.0 <= t <= 1.0 for t in thresholds):
        _fail("sweep_thresholds", OmegaConf.to_object(thresholds), "must be a list of numbers in [0, 1]")
    if cfg.task == "sample" and not cfg.question:
        raise ConfigError('task=sample needs question="..." (and image=PATH for a visual question).')


ANALYSIS_POLICIES = ("none", "dynamic", "vtw")


def check_analyze_config(cfg: DictConfig) -> None:
    """Every key of `conf/analyze.yaml` (with its groups) that a user sets."""
    check_model(cfg)
    check_data(cfg)
    _given(cfg, "analysis.split", "the split of data to analyse (e.g. test)")
    _integer(cfg, "analysis.n", 1, optional=True)
    _choice(cfg, "analysis.policy", ANALYSIS_POLICIES)
    if cfg.analysis.policy == "vtw":
        _integer(cfg, "analysis.vtw_layer", 0)
    elif cfg.analysis.vtw_layer is not None:
        _fail("analysis.vtw_layer", cfg.analysis.vtw_layer, "is the exit layer of analysis.policy=vtw; set that policy")
    if cfg.analysis.policy == "dynamic":
        _given(cfg, "heads", "analysis.policy=dynamic needs exit heads: a train.py run's heads/ folder or a Hub id")
    _number(cfg, "threshold", 0.0, 1.0, optional=True)
    layers = cfg.analysis.withdrawal_layers
    if layers is not None:
        values = OmegaConf.to_object(layers) if isinstance(layers, ListConfig) else layers
        if not isinstance(values, list) or not values or not all(
                isinstance(k, Integral) and not isinstance(k, bool) and k >= 0 for k in values):
            _fail("analysis.withdrawal_layers", values, "must be null (every layer) or a list of exit layers >= 0")
    _number(cfg, "analysis.min_dip", 0.0, 1.0)
    _integer(cfg, "analysis.query_chunk", 1)
    _integer(cfg, "batch_size", 1)
    _integer(cfg, "max_new_tokens", 1)
    _integer(cfg, "seed", 0)


SERVE_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


def check_serve_config(cfg: DictConfig) -> None:
    """Every key of `conf/serve.yaml`: infer.py's (model, heads, policies' settings; its `task` is not used) and the
    server's own."""
    check_infer_config(OmegaConf.merge(cfg, {"task": "eval"}))
    _choice(cfg, "host", SERVE_HOSTS)
    _integer(cfg, "port", 1024)
    if cfg.port > 65535:
        _fail("port", cfg.port, "must be in 1024..65535")
    if isinstance(cfg.policies, str) or not cfg.policies:
        _fail("policies", cfg.policies, "must be a non-empty list of policy names, e.g. [none,dynamic]")
    _given(cfg, "policy", "the policy of requests that name none, e.g. policy=dynamic")
    _choice(cfg, "allow_exit_layer", (True, False))
    _integer(cfg, "max_batch_size", 1)
    _number(cfg, "batch_timeout", 0.0, float("inf"), low_open=cfg.max_batch_size > 1)
    _integer(cfg, "max_tokens", 1)
    if cfg.max_new_tokens > cfg.max_tokens:
        _fail("max_new_tokens", cfg.max_new_tokens, f"is the default max_tokens of a request: at most max_tokens="
              f"{cfg.max_tokens}")
    _integer(cfg, "max_prompt_tokens", 1, optional=True)
    _integer(cfg, "max_images", 0)
    _integer(cfg, "max_image_pixels", 1)
    _choice(cfg, "require_image", (True, False))
    _choice(cfg, "allow_local_paths", (True, False))
    _number(cfg, "request_timeout", 0.0, float("inf"), low_open=True)
    _integer(cfg, "max_request_bytes", 1)
    _number(cfg, "read_timeout", 0.0, float("inf"), low_open=True)
    _number(cfg, "idle_timeout", 0.0, float("inf"), low_open=True)
