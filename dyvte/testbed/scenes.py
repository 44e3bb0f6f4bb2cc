"""Procedural visual question answering: scenes, renderings, questions and LLaVA-format splits.

A scene is a handful of objects on a `grid x grid` board whose cells are exactly the vision tower's patches, so
one object is one visual token: the vision tower only has to describe a cell, and every question that relates
objects has to be answered by the language model's layers, which is where visual-token exit acts. Objects sit
in distinct rows, so "above", "below" and "top to bottom" are unambiguous, and top to bottom is also the order
of the visual tokens (row-major patches), which makes the dense grounding task learnable by a tiny model.

Question families go from one-hop look-ups that resolve early (is there a red circle?) to multi-hop ones
(what colour is the object above the blue square?) and one with multi-token answers (list the colours).
Answers are balanced within each family so that the language prior alone is at chance.
"""

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 135, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("big", "small")
DIGITS = "123456789"
BACKGROUND = (235, 235, 235)

# 3x5 bitmaps: the glyph is drawn pixel-exact (no font files, identical on every machine).
_GLYPHS = {
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "011", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
}

# Families evaluated in the splits, roughly from easiest to hardest for the language model.
FAMILIES = ("presence", "count", "colour", "shape", "glyph", "glyph_colour", "relation", "list_colours")
# Dense grounding used only in pre-training: it forces every object's attributes through the visual tokens.
AUX_FAMILIES = ("describe",)
SPLITS = ("train", "val", "test", "certification")  # in the order generate_dataset draws them: test first


@dataclass(frozen=True)
class SceneConfig:
    """Board geometry and object counts. `cell` must equal the vision tower's patch size."""

    grid: int = 8
    cell: int = 12
    min_objects: int = 2
    max_objects: int = 6
    glyph_prob: float = 0.6

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.grid:
            raise ValueError(
                f"impossible configuration: max_objects={self.max_objects} objects need distinct rows "
                f"but the grid has only {self.grid}"
            )
        if self.max_objects > len(COLOURS) * len(SHAPES):
            raise ValueError(f"impossible configuration: max_objects={self.max_objects} exceeds distinct objects")
        if self.max_objects > len(DIGITS):
            raise ValueError(f"impossible configuration: max_objects={self.max_objects} exceeds distinct glyphs")
        if self.cell < 8:
            raise ValueError(f"cell={self.cell} px is too small to draw a glyph on an object (need >= 8)")

    @property
    def image_size(self) -> int:
        return self.grid * self.cell


@dataclass(frozen=True)
class Obj:
    col: int
    row: int
    colour: str
    shape: str
    size: str
    glyph: str | None


Scene = tuple[Obj, ...]  # sorted by row, i.e. top to bottom


def sample_scene(rng: random.Random, config: SceneConfig) -> Scene:
    """Distinct rows, distinct (colour, shape) pairs and distinct glyphs, so every reference is unique."""
    n = rng.randint(config.min_objects, config.max_objects)
    rows = sorted(rng.sample(range(config.grid), n))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    digits = iter(rng.sample(DIGITS, n))
    objects = []
    for row, (colour, shape) in zip(rows, pairs):
        size = rng.choice(SIZES)
        glyph = next(digits)
        has_glyph = size == "big" and rng.random() < config.glyph_prob
        objects.append(Obj(rng.randrange(config.grid), row, colour, shape, size, glyph if has_glyph else None))
    return tuple(objects)


def scene_hash(scene: Scene) -> str:
    return hashlib.sha1(repr(scene).encode()).hexdigest()[:16]


def render(scene: Scene, config: SceneConfig) -> Image.Image:
    image = Image.new("RGB", (config.image_size, config.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0 = obj.col * config.cell, obj.row * config.cell
        inset = 1 if obj.size == "big" else config.cell // 6 + 1
        a, b = x0 + inset, y0 + inset
        c, d = x0 + config.cell - 1 - inset, y0 + config.cell - 1 - inset
        fill = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle((a, b, c, d), fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((a, b, c, d), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((a + c) / 2, b), (c, d), (a, d)], fill=fill)
        else:
            draw.polygon([((a + c) / 2, b), (c, (b + d) / 2), ((a + c) / 2, d), (a, (b + d) / 2)], fill=fill)
        if obj.glyph is not None:
            gx, gy = x0 + config.cell // 2 - 1, y0 + config.cell // 2 - 2
            for dy, line in enumerate(_GLYPHS[obj.glyph]):
                for dx, bit in enumerate(line):
                    if bit == "1":
                        draw.point((gx + dx, gy + dy), fill=(0, 0, 0))
    return image


def _name(obj: Obj) -> str:
    return f"{obj.colour} {obj.shape}"


def make_question(family: str, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) for `family` about `scene`, or None when the scene cannot pose it."""
    if family == "presence":
        present = {(o.colour, o.shape) for o in scene}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
            answer = "yes"
        else:
            colour, shape = rng.choice(sorted({(c, s) for c in COLOURS for s in SHAPES} - present))
            answer = "no"
        return f"is there a {colour} {shape} ?", answer
    if family == "count":
        return "how many objects are there ?", str(len(scene))
    if family in ("colour", "shape"):  # one attribute names the object, the other is asked
        named_by = "shape" if family == "colour" else "colour"
        unique = [o for o in scene if sum(getattr(p, named_by) == getattr(o, named_by) for p in scene) == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        if family == "colour":
            return f"what colour is the {obj.shape} ?", obj.colour
        return f"what shape is the {obj.colour} object ?", obj.shape
    if family in ("glyph", "glyph_colour"):  # read the digit of an object, or find the object by its digit
        marked = [o for o in scene if o.glyph is not None]
        if not marked:
            return None
        obj = rng.choice(marked)
        if family == "glyph":
            return f"what digit is on the {_name(obj)} ?", obj.glyph
        return f"what colour is the object with digit {obj.glyph} ?", obj.colour
    if family == "relation":
        if len(scene) < 2:
            return None
        i = rng.randrange(len(scene) - 1)
        if rng.random() < 0.5:
            return f"what colour is the object above the {_name(scene[i + 1])} ?", scene[i].colour
        return f"what colour is the object below the {_name(scene[i])} ?", scene[i + 1].colour
    if family == "list_colours":
        return "list the colours from top to bottom .", " ".join(o.colour for o in scene)
    if family == "describe":
        parts = [f"{o.size} {_name(o)} {o.glyph or 'blank'}" for o in scene]
        return "describe the objects from top to bottom .", " ; ".join(parts)
    raise ValueError(f"unknown question family {family!r}; known: {FAMILIES + AUX_FAMILIES}")


def check_families(families) -> tuple[str, ...]:
    for family in families:
        if family not in FAMILIES + AUX_FAMILIES:
            raise ValueError(f"unknown question family {family!r}; known: {FAMILIES + AUX_FAMILIES}")
    return tuple(families)


def vocabulary() -> list[str]:
    """Every word any question or answer can contain (the tokenizer is word-level)."""
    words = set("USER ASSISTANT : ; ? . blank yes no".split())
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(DIGITS)
    templates = [
        "is there a how many objects are there what colour is the what shape is the object",
        "what digit is on the with digit above below list the colours from top to bottom",
        "describe the objects",
    ]
    for line in templates:
        words |= set(line.split())
    return sorted(words)


def scene_stream(seed: int, stream: str, config: SceneConfig, exclude: set[str] = frozenset()):
    """Endless deterministic scenes of one named stream, skipping scenes whose hash is in `exclude`."""
    rng = random.Random(f"{seed}/{stream}")
    seen = set(exclude)
    while True:
        scene = sample_scene(rng, config)
        h = scene_hash(scene)
        if h not in seen:
            seen.add(h)
            yield scene, h


def build_split(
    split: str,
    n_images: int,
    seed: int,
    config: SceneConfig,
    exclude: set[str],
    questions_per_image: int = 4,
    families=FAMILIES,
) -> tuple[list[dict], list[tuple[str, Scene]]]:
    """LLaVA records and (image name, scene) pairs for one split. Families are kept balanced by always asking
    the least-asked family the scene can pose."""
    families = check_families(families)
    rng = random.Random(f"{seed}/{split}/questions")
    asked = {f: 0 for f in families}
    records, images = [], []
    for index, (scene, h) in zip(range(n_images), scene_stream(seed, split, config, exclude)):
        name = f"{split}_{index:05d}.png"
        images.append((name, scene))
        order = sorted(families, key=lambda f: (asked[f], rng.random()))
        taken = 0
        for family in order:
            if taken == questions_per_image:
                break
            qa = make_question(family, scene, rng)
            if qa is None:
                continue
            asked[family] += 1
            taken += 1
            records.append(
                {
                    "id": f"{split}-{index:05d}-{family}",
                    "image": name,
                    "family": family,
                    "scene": h,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{qa[0]}"},
                        {"from": "gpt", "value": qa[1]},
                    ],
                }
            )
    return records, images


@dataclass(frozen=True)
class SplitSizes:
    """Images per split; each image carries `questions_per_image` questions. `certification` holds rows for certified
    thresholds (`validate.target_agreement`): never trained on, never used to choose thresholds."""

    train: int = 1500
    val: int = 100
    test: int = 160
    certification: int = 1000
    questions_per_image: int = 4


def generate_dataset(
    out_dir: Path,
    seed: int = 0,
    config: SceneConfig = SceneConfig(),
    sizes: SplitSizes = SplitSizes(),
    overwrite: bool = False,
) -> dict[str, list[dict]]:
    """Write `{train,val,test,certification}.json`, `images/` and `manifest.json` into `out_dir`.

    Test scenes are drawn first, then val excluding test, then train excluding both, then certification excluding
    all three; each split's scenes come from its own stream, so a larger split keeps a smaller one as its prefix.
    Pre-training streams exclude val, test and certification as well (see `held_out_hashes`). A folder written with another seed or config is
    refused unless `overwrite`, so two generations never mix.
    """
    out_dir = Path(out_dir)
    manifest = {"seed": seed, "scene_config": asdict(config), "sizes": asdict(sizes), "families": list(FAMILIES)}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if existing != manifest and not overwrite:
            raise ValueError(
                f"{out_dir} holds data generated with {existing}, not {manifest}; pass overwrite=True (--overwrite)"
            )
    image_dir = out_dir / "images"
    if image_dir.exists():
        for old in image_dir.glob("*.png"):
            old.unlink()
    image_dir.mkdir(parents=True, exist_ok=True)
    exclude: set[str] = set()
    splits = {}
    for split in ("test", "val", "train", "certification"):
        records, images = build_split(
            split, getattr(sizes, split), seed, config, exclude, sizes.questions_per_image
        )
        exclude |= {scene_hash(scene) for _, scene in images}
        for name, scene in images:
            render(scene, config).save(image_dir / name, optimize=True)
        (out_dir / f"{split}.json").write_text(json.dumps(records, indent=1))
        splits[split] = records
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return splits


def held_out_hashes(data_dir: Path) -> set[str]:
    """Scene hashes of the val, test and certification splits (those a folder has), which pre-training must never
    see."""
    hashes = set()
    for split in ("val", "test", "certification"):
        path = Path(data_dir) / f"{split}.json"
        if path.exists():
            hashes |= {r["scene"] for r in json.loads(path.read_text())}
    return hashes


def load_split(data_dir: Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    return json.loads((Path(data_dir) / f"{split}.json").read_text())
