"""The policy registry: every policy a user names (`policy=`, `policies=[...]`, a server's `policies`,
`budget_methods`) is declared here once, and what the rest of dyvte knows about policies derives from it.

A `PolicySpec` declares a policy's name, its kind (what `check_composition` reads), its settings dataclass (the
defaults and checks of its config section `name.*`, e.g. `fastv.layer`; `dyvte.configs` stores the defaults as the
config's and checks a user's values through it), how it is built from those settings and what the run resolved
(`PolicySettings`), the knob a budget sets (`budget_knob`, solved by `at_budget`'s formula of the equal-budget rule,
or by measuring when it has none), and what it needs (`Needs`: heads, the model, families, towers; checked before
model time by `dyvte.preflight`). From the registry come `build_policy`, `budget_policy`, `BUDGET_METHODS`,
`POLICY_NAMES` (the names every start-up check and the server accept), and the configs' per-policy defaults.

Adding a method: its module (the policy class, its settings dataclass and, with a budget knob, its `at_budget`
function) and one `PolicySpec` below; docs/design.md ("Adding a method") lists the steps.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..adapters.llava import GRID_FAMILIES
from ..engine import ExitPolicy
from ..heads import ExitHeads
from .exit import DynamicExit, DynamicSettings, NoExit, StaticExit, VTWSettings, vtw_at_budget
from .input_selectors import (
    CDPruner,
    CDPrunerSettings,
    DivPrune,
    DivPruneSettings,
    Downsample,
    DownsampleSettings,
    VisionZip,
    VisionZipSettings,
    VisPruner,
    VisPrunerSettings,
    divprune_at_budget,
    downsample_at_budget,
    keep_share_at_budget,
)
from .mergers import ToMe, ToMeSettings, tome_at_budget
from .pruners import (
    DART,
    AutoPrune,
    AutoPruneSettings,
    DARTSettings,
    FastV,
    FastVSettings,
    PyramidDrop,
    PyramidDropSettings,
    RandomPrune,
    RandomPruneSettings,
    SparseVLM,
    SparseVLMSettings,
    autoprune_at_budget,
    pdrop_at_budget,
    sparsevlm_at_budget,
)
from .schedules import GSearchSettings, KeepRateSchedule, PSigmoidSettings
from .tokens import prune_at_budget

# What a policy is (`check_composition` reads the kinds): the stock model; exit policies decide the exit layer;
# input selectors choose, each to its own budget, the visual tokens that enter the LLM; in-LLM pruners and mergers
# remove tokens between decoder layers; schedules give a keep rate per layer, found by a search.
STOCK, EXIT, INPUT_SELECTOR, PRUNER, MERGER, SCHEDULE = (
    "stock", "exit", "input selector", "in-LLM pruner", "merger", "schedule")


@dataclass(frozen=True)
class Needs:
    """What a policy needs besides its settings."""

    heads: bool = False  # trained exit heads (`heads=DIR`, `PolicySettings.heads`)
    model: bool = False  # the MLLM itself when it is built (`PolicySettings.model`: its vision tower or its depth)
    families: tuple[str, ...] | None = None  # the `model_type`s it runs on; None: every supported family
    towers: tuple[str, ...] | None = None  # the vision towers' `model_type`s it runs on; None: any


@dataclass
class PolicySettings:
    """What `build_policy` builds a named policy from: each registered policy's settings (`options`, by name; one
    missing there takes its dataclass defaults) and what the run resolved besides them: dynamic exit's heads and
    threshold (its settings are the top-level keys `threshold` and `force`), VTW's searched layer, the searched or
    loaded keep-rate schedules, and the model."""

    heads: ExitHeads | None = None
    threshold: float | None = None  # dynamic exit's; None: the heads' calibrated threshold
    force: bool = False  # allow a threshold outside [0, 1]
    vtw_layer: int | None = None  # VTW's exit layer where `vtw.layer` is None (from `vtw_search`)
    gsearch: KeepRateSchedule | None = None  # from `dyvte.policies.search.g_search` (or its saved JSON)
    psigmoid: KeepRateSchedule | None = None  # from `dyvte.policies.search.p_sigmoid_search` (or its saved JSON)
    model: object = None  # the MLLM, for the policies that need it (`Needs.model`)
    options: dict[str, object] = field(default_factory=dict)  # policy name -> its settings dataclass

    def options_for(self, spec: "PolicySpec"):
        """The settings of `spec`'s policy: as given in `options`, else its dataclass defaults."""
        return self.options.get(spec.name) or spec.settings()


@dataclass(frozen=True)
class PolicySpec:
    """One registered policy; see the module docstring."""

    name: str  # what users type
    kind: str  # STOCK, EXIT, INPUT_SELECTOR, PRUNER, MERGER or SCHEDULE
    settings: type | None  # its settings dataclass (config section `name.*`); None: it has none
    build: Callable[[object, PolicySettings], ExitPolicy]  # (its settings, the run's) -> the policy
    budget_knob: str | None = None  # the setting a budget sets; None: not a budget method
    at_budget: Callable | None = None  # (settings, share, num_layers, n_visual) -> (settings | None, words)
    needs: Needs = Needs()
    top_level: bool = False  # its settings are top-level config keys, not a section `name.*`

    def key(self, setting: str) -> str:
        """The config key a user types for one of its settings."""
        return setting if self.top_level else f"{self.name}.{setting}"


def _depth(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def _vtw(settings: VTWSettings, run: PolicySettings) -> StaticExit:
    layer = run.vtw_layer if settings.layer is None else settings.layer
    if layer is None:
        raise ValueError("policy 'vtw' needs a withdrawal layer (vtw_layer, or run vtw_search).")
    return StaticExit(layer)


def _searched(name: str) -> Callable[[object, PolicySettings], KeepRateSchedule]:
    def schedule(settings, run: PolicySettings) -> KeepRateSchedule:
        searched = getattr(run, name)
        if searched is None:
            raise ValueError(f"policy {name!r} needs keep rates ({name}.path=FILE, or run its search).")
        return searched

    return schedule


REGISTRY: dict[str, PolicySpec] = {spec.name: spec for spec in (
    PolicySpec("none", STOCK, None, lambda s, run: NoExit()),
    PolicySpec("vtw", EXIT, VTWSettings, _vtw, "layer", vtw_at_budget),
    PolicySpec("fastv", PRUNER, FastVSettings, lambda s, run: FastV(**asdict(s)), "keep_ratio", prune_at_budget),
    PolicySpec("dynamic", EXIT, DynamicSettings, lambda s, run: DynamicExit(run.heads, run.threshold, run.force),
               "threshold", needs=Needs(heads=True), top_level=True),
    PolicySpec("gsearch", SCHEDULE, GSearchSettings, _searched("gsearch")),
    PolicySpec("psigmoid", SCHEDULE, PSigmoidSettings, _searched("psigmoid")),
    PolicySpec("random", PRUNER, RandomPruneSettings, lambda s, run: RandomPrune(**asdict(s)), "keep_ratio",
               prune_at_budget),
    PolicySpec("downsample", INPUT_SELECTOR, DownsampleSettings, lambda s, run: Downsample(**asdict(s)),
               "keep_ratio", downsample_at_budget, Needs(families=GRID_FAMILIES)),
    PolicySpec("tome", MERGER, ToMeSettings, lambda s, run: ToMe(**asdict(s)), "r", tome_at_budget),
    PolicySpec("visionzip", INPUT_SELECTOR, VisionZipSettings, lambda s, run: VisionZip(run.model, **asdict(s)),
               "keep_ratio", keep_share_at_budget, Needs(model=True, families=GRID_FAMILIES)),
    PolicySpec("pdrop", PRUNER, PyramidDropSettings, lambda s, run: PyramidDrop(_depth(run.model), **asdict(s)),
               "ratio", pdrop_at_budget, Needs(model=True)),
    PolicySpec("dart", PRUNER, DARTSettings, lambda s, run: DART(**asdict(s)), "keep_ratio", prune_at_budget),
    PolicySpec("vispruner", INPUT_SELECTOR, VisPrunerSettings, lambda s, run: VisPruner(run.model, **asdict(s)),
               "keep_ratio", keep_share_at_budget,
               Needs(model=True, families=GRID_FAMILIES, towers=("clip_vision_model",))),
    PolicySpec("cdpruner", INPUT_SELECTOR, CDPrunerSettings, lambda s, run: CDPruner(**asdict(s)), "keep_ratio",
               keep_share_at_budget),
    PolicySpec("divprune", INPUT_SELECTOR, DivPruneSettings, lambda s, run: DivPrune(**asdict(s)), "keep_ratio",
               divprune_at_budget),
    PolicySpec("sparsevlm", PRUNER, SparseVLMSettings, lambda s, run: SparseVLM(_depth(run.model), **asdict(s)),
               "keep_ratios", sparsevlm_at_budget, Needs(model=True)),
    PolicySpec("autoprune", PRUNER, AutoPruneSettings, lambda s, run: AutoPrune(run.model, **asdict(s)), "share",
               autoprune_at_budget, Needs(model=True, families=GRID_FAMILIES, towers=("clip_vision_model",))),
)}
#: Every name `build_policy` knows (a `+` composition joins them); the start-up checks and the server accept these.
POLICY_NAMES = tuple(REGISTRY)
#: The methods `budget=` sets (`budget_methods`); the exit policies last, closing each budget's rows.
BUDGET_METHODS = tuple(sorted((spec.name for spec in REGISTRY.values() if spec.budget_knob),
                              key=lambda name: REGISTRY[name].kind == EXIT))


def nominal_visual_tokens(config) -> int:
    """The visual tokens of one image that budgets and reach checks assume for a model of config `config` (or None):
    its `image_seq_length`, else 576 (a LLaVA-1.5 image)."""
    return getattr(config, "image_seq_length", None) or 576


def spec_of(name: str) -> PolicySpec:
    """The registered policy `name`, or an error listing the registered ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; policies: {', '.join(POLICY_NAMES)} and '+' compositions.")
    return REGISTRY[name]


def needs_heads(name: str) -> bool:
    """Whether policy `name` (or a part of the `+` composition `name`) needs trained exit heads."""
    return any(spec_of(part).needs.heads for part in name.split("+"))


# The kinds of which a composition holds at most one, and why two contradict ({first}: the first of them).
CLASHES = {
    INPUT_SELECTOR: "both choose the visual tokens that enter the LLM, each to its own budget; composed, only the "
                    "tokens both choose stay, so neither budget holds. Use one of them, e.g. {first}+dynamic.",
    EXIT: "both decide the exit layer; the earlier exit always wins, so one of them does nothing. Use one exit "
          "policy.",
}


def check_composition(parts: list[str]) -> None:
    """Refuse a `+` composition whose parts contradict, naming them and the fix."""
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ValueError(
            f"policy {'+'.join(parts)!r} names {repeated[0]!r} twice; each policy may appear once in a composition."
        )
    for kind, why in CLASHES.items():
        clashing = [part for part in parts if spec_of(part).kind == kind]
        if len(clashing) > 1:
            first, second = clashing[:2]
            raise ValueError(f"policy {'+'.join(parts)!r}: {first!r} and {second!r} {why.format(first=first)}")


def _build(spec: PolicySpec, settings, run: PolicySettings) -> ExitPolicy:
    if spec.needs.heads and run.heads is None:
        raise ValueError(f"policy {spec.name!r} needs trained exit heads (heads=DIR).")
    if spec.needs.model and run.model is None:
        raise ValueError(f"policy {spec.name!r} needs the model (PolicySettings.model).")
    return spec.build(settings, run)


def build_policy(name: str, settings: PolicySettings) -> ExitPolicy:
    """A registered policy (`POLICY_NAMES`) or a `+` composition such as `cdpruner+dynamic` (`check_composition`
    refuses parts that contradict), built from `settings`."""
    parts = name.split("+")
    if len(parts) > 1:
        check_composition(parts)
        policy = build_policy(parts[0], settings)
        for part in parts[1:]:
            policy = policy + build_policy(part, settings)
        return policy
    spec = spec_of(name)
    return _build(spec, settings.options_for(spec) if spec.settings else None, settings)


def budget_policy(method: str, share: float, num_layers: int, settings: PolicySettings
                  ) -> tuple[ExitPolicy | None, str]:
    """`method` with its budget knob set to the budget `share` by its formula (its other settings from `settings`):
    the policy and its setting in words, or None and why the budget is out of its reach."""
    spec = REGISTRY.get(method)
    if spec is None or spec.at_budget is None:
        formulas = [name for name in BUDGET_METHODS if REGISTRY[name].at_budget]
        raise ValueError(f"{method!r} has no budget formula; methods with one: {', '.join(formulas)}.")
    n_visual = nominal_visual_tokens(getattr(settings.model, "config", None))
    solved, words = spec.at_budget(settings.options_for(spec), share, num_layers, n_visual)
    return (None if solved is None else _build(spec, solved, settings)), words
