"""``builtin:scenes``: deterministic captioned synthetic scenes, the project's embedded demo data.

Small scenes of 1-3 coloured shapes on light textured backgrounds, with captions in a few
natural phrasings ("a small red circle to the left of a blue square", "two green triangles").
Everything is a pure function of ``(seed, split, index)``, so nothing is stored on disk and a
tiny CLIP can be trained and evaluated anywhere in minutes.

Compositional hold-out: :data:`HELDOUT_COMBOS` (8 of the 42 colour-shape combinations, each
colour and each shape still seen in training with other partners) never appear in the train
split, neither drawn nor named, so zero-shot accuracy on them measures transfer to unseen
combinations (task ``heldout_colour_shape``; compare with ``seen_colour_shape``).

Relations are the slowest skill for a contrastive model: a random batch is told apart by object
identity alone. So most relation scenes draw their two objects from :data:`RELATION_POOL` (which
holds the ``position`` task's pair): batches then contain the same objects in other arrangements.

Vocabulary (kept small on purpose): colours red green blue yellow purple orange black; shapes
circle square triangle star cross diamond; sizes small large; backgrounds white grey beige;
counts one two three; relations "to the left of" / "to the right of" / "above" / "below".
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from dataclasses import dataclass, field
import numpy as np
from PIL import Image, ImageDraw

from .base import PairSource, Sample, stable_rng

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 50),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 175),
    "orange": (245, 130, 25),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: dict[str, float] = {"small": 0.20, "large": 0.32}  # bounding box side / image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (244, 244, 240), "grey": (192, 192, 192),
                                                "beige": (232, 218, 186)}
TEXTURES: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Colour-shape combinations never shown or named in the train split (8/42 = 19%).
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "circle"), ("blue", "star"), ("yellow", "square"),
    ("purple", "diamond"), ("orange", "cross"), ("black", "triangle"), ("green", "square"),
)
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(x for x in ALL_COMBOS if x not in HELDOUT_COMBOS)

#: Scene kinds and their share of generated scenes.
KINDS: tuple[tuple[str, float], ...] = (("single", 0.25), ("relation", 0.35), ("count", 0.25), ("trio", 0.15))
RELATIONS = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}
#: Where each object of a relation scene is, said of one object at a time ("the red circle is on
#: the left"): learnable from words alone, unlike the full relation, whose two phrasings use the
#: same words for both arrangements and so need word order.
PLACES = {"left": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}

# The fixed object pair of the ``position`` task (both seen in training).
POSITION_PAIR: tuple[tuple[str, str], tuple[str, str]] = (("red", "circle"), ("blue", "square"))

#: Most relation scenes use one of these few object pairs, so a training batch holds the same two
#: objects in other arrangements: without such hard negatives, object identity alone tells the
#: scenes of a batch apart, the contrastive loss never rewards encoding where things are, and the
#: relation is not learned (the bag-of-words failure of CLIP-style models, Yuksekgonul et al. 2023).
RELATION_POOL: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    POSITION_PAIR,
    (("green", "triangle"), ("yellow", "star")),
    (("purple", "cross"), ("orange", "circle")),
    (("black", "star"), ("red", "diamond")),
)
RELATION_POOL_SHARE = 0.7


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str   # "small" | "large"
    x: float    # centre, as a fraction of the image side
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """What a scene contains; rendering and captions are functions of it."""

    kind: str                      # single | relation | count | trio
    objects: tuple[SceneObject, ...]
    background: str
    texture: str
    relation: str | None = None    # relation scenes: objects[0] is "left"-of / "above" objects[1]
    render_seed: int = 0           # texture noise, colour jitter

    def combos(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}


# ----------------------------------------------------------------------------- layout
def _grid_positions(rng: random.Random, n: int, sizes: list[float]) -> list[tuple[float, float]]:
    """n objects in distinct cells of a 3x3 grid, jittered without overlapping."""
    cells = rng.sample(range(9), n)
    out = []
    for cell, sz in zip(cells, sizes):
        j = max(0.0, (1 / 3 - sz) / 2 - 0.005)
        cx, cy = (cell % 3 * 2 + 1) / 6, (cell // 3 * 2 + 1) / 6
        out.append((cx + rng.uniform(-j, j), cy + rng.uniform(-j, j)))
    return out


def _pick_size(rng: random.Random) -> str:
    return rng.choice(("small", "large"))


def single_objects(rng: random.Random, combo: tuple[str, str], size: str | None = None) -> tuple[SceneObject, ...]:
    """One object of ``combo`` (colour, shape) anywhere near the centre."""
    return (SceneObject(*combo, size or _pick_size(rng), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),)


def relation_objects(rng: random.Random, a: tuple[str, str], b: tuple[str, str], relation: str) -> tuple[SceneObject, ...]:
    """Objects ``a`` then ``b`` on one axis: ``a`` left of (``relation="left"``) or above ``b``."""
    za, zb = _pick_size(rng), _pick_size(rng)
    near, far = rng.uniform(0.17, 0.32), rng.uniform(0.68, 0.83)
    common = rng.uniform(0.3, 0.7)
    ja, jb = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    if relation == "left":
        pa, pb = (near, common + ja), (far, common + jb)
    else:
        pa, pb = (common + ja, near), (common + jb, far)
    return SceneObject(*a, za, *pa), SceneObject(*b, zb, *pb)


def count_objects(rng: random.Random, combo: tuple[str, str], n: int) -> tuple[SceneObject, ...]:
    """``n`` objects of ``combo``, one size, in distinct grid cells."""
    size = _pick_size(rng)
    pos = _grid_positions(rng, n, [SIZES[size]] * n)
    return tuple(SceneObject(*combo, size, x, y) for x, y in pos)


def _trio(rng: random.Random, combos: list[tuple[str, str]]) -> tuple[SceneObject, ...]:
    sizes = [_pick_size(rng) for _ in combos]
    pos = _grid_positions(rng, len(combos), [SIZES[z] for z in sizes])
    objs = [SceneObject(*c, z, x, y) for c, z, (x, y) in zip(combos, sizes, pos)]
    return tuple(sorted(objs, key=lambda o: (round(o.x * 3 - 0.5), o.y)))  # left to right, then top down


def finish_scene(rng: random.Random, kind: str, objects: tuple[SceneObject, ...], relation: str | None = None) -> SceneSpec:
    """``objects`` as a scene of ``kind`` on a drawn background and texture, with its render seed."""
    return SceneSpec(kind=kind, objects=objects, background=rng.choice(list(BACKGROUNDS)),
                     texture=rng.choice(TEXTURES), relation=relation, render_seed=rng.getrandbits(63))


def make_scene(rng: random.Random, combos: tuple[tuple[str, str], ...] = TRAIN_COMBOS) -> SceneSpec:
    """A random scene using only ``combos`` (every object's colour-shape pair is in it)."""
    r = rng.random()
    acc = 0.0
    kind = KINDS[-1][0]
    for k, p in KINDS:
        acc += p
        if r < acc:
            kind = k
            break
    if kind == "single":
        return finish_scene(rng, kind, single_objects(rng, rng.choice(combos)))
    if kind == "relation":
        pool = [p for p in RELATION_POOL if p[0] in combos and p[1] in combos]
        if pool and rng.random() < RELATION_POOL_SHARE:
            a, b = rng.sample(rng.choice(pool), 2)  # random order: either object may be left / top
        else:
            a, b = rng.sample(combos, 2)
        rel = rng.choice(("left", "above"))
        return finish_scene(rng, kind, relation_objects(rng, a, b, rel), rel)
    if kind == "count":
        return finish_scene(rng, kind, count_objects(rng, rng.choice(combos), rng.choice((2, 3))))
    return finish_scene(rng, kind, _trio(rng, rng.sample(combos, 3)))


# ----------------------------------------------------------------------------- captions
def scene_captions(spec: SceneSpec, generic: bool = True) -> list[str]:
    """All true captions of a scene (the loader samples one per step). Most name every object;
    the partial ones say where one object of a pair is, or give a count without colour, and
    ``generic`` adds the count-only "a picture of N objects." (the counting task's phrasing).
    The article is always "a" ("a orange star"): one phrasing per object keeps the vocabulary
    minimal and makes prompts match the training captions word for word."""
    o = spec.objects
    bg = spec.background
    if spec.kind == "single":
        a = o[0]
        caps = [f"a {a.name}", f"a {a.size} {a.name}", f"a photo of a {a.name}.",
                f"a {a.size} {a.name} on a {bg} background", f"one {a.name}"]
        return caps + (["a picture of one object."] if generic else [])
    if spec.kind == "relation":
        a, b = o
        fwd, back = RELATIONS[spec.relation or "left"]
        first, second = PLACES[spec.relation or "left"]
        caps = [f"a {a.name} {fwd} a {b.name}", f"a {b.name} {back} a {a.name}",
                f"a {a.size} {a.name} {fwd} a {b.size} {b.name}", f"a {b.size} {b.name} {back} a {a.size} {a.name}",
                f"the {a.name} is {first}", f"the {b.name} is {second}"]
        return caps + (["a picture of two objects."] if generic else [])
    if spec.kind == "count":
        a, n = o[0], COUNT_WORDS[len(o) - 1]
        pl = f"{a.colour} {plural(a.shape)}"
        caps = [f"{n} {pl}", f"{n} {a.size} {pl}", f"a picture of {n} {pl}.", f"{n} {plural(a.shape)}",
                f"{n} {a.size} {pl} on a {bg} background"]
        return caps + ([f"a picture of {n} objects."] if generic else [])
    names = [x.name for x in o]
    sized = [f"{x.size} {x.name}" for x in o]
    caps = [f"a {names[0]}, a {names[1]} and a {names[2]}", f"a {sized[0]}, a {sized[1]} and a {sized[2]}",
            f"three objects: a {names[0]}, a {names[1]} and a {names[2]}"]
    return caps + (["a picture of three objects."] if generic else [])


def retrieval_captions(spec: SceneSpec) -> list[str]:
    """The most specific captions of a scene (sizes, background), for retrieval evaluation."""
    o, bg = spec.objects, spec.background
    if spec.kind == "single":
        return [f"a {o[0].size} {o[0].name} on a {bg} background"]
    if spec.kind == "relation":
        a, b = o
        fwd, back = RELATIONS[spec.relation or "left"]
        return [f"a {a.size} {a.name} {fwd} a {b.size} {b.name}", f"a {b.size} {b.name} {back} a {a.size} {a.name}"]
    if spec.kind == "count":
        a, n = o[0], COUNT_WORDS[len(o) - 1]
        return [f"{n} {a.size} {a.colour} {plural(a.shape)} on a {bg} background"]
    sized = [f"{x.size} {x.name}" for x in o]
    return [f"a {sized[0]}, a {sized[1]} and a {sized[2]}"]


# ----------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=8)
def _coords(size: int) -> tuple[np.ndarray, ...]:
    """Pixel coordinate maps used by the textures (cached per image size; read-only)."""
    yy, xx = np.mgrid[0:size, 0:size]
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    out = (xx, yy, xx + yy, xx - yy + size, g)
    for a in out:
        a.setflags(write=False)
    return out


def _background(spec: SceneSpec, size: int, nrng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[spec.background], dtype=np.float32) + nrng.uniform(-8, 8, 3).astype(np.float32)
    t = spec.texture
    if t == "plain":
        shade = np.zeros((size, size, 1), np.float32)
    elif t == "gradient":
        ang = nrng.uniform(0, 2 * math.pi)
        g = _coords(size)[4]
        ramp = math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None]
        shade = (ramp * nrng.uniform(10, 20))[..., None]
    elif t == "noise":
        shade = nrng.normal(0, 7, (size, size, 1)).astype(np.float32)
    else:  # stripes
        period = max(4, int(round(nrng.uniform(5, 9) * size / 64)))
        coord = _coords(size)[int(nrng.integers(4))]
        shade = (((coord // (period // 2)) % 2) * -nrng.uniform(10, 16)).astype(np.float32)[..., None]
    img = shade + base
    np.clip(img, 150, 255, out=img)  # light: never confusable with object colours
    return img.astype(np.uint8)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.86
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.36
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_scene(spec: SceneSpec, image_size: int = 64) -> Image.Image:
    """Draw a scene (2x supersampled for smooth edges at small sizes)."""
    nrng = np.random.default_rng(spec.render_seed)
    ss = 2 if image_size <= 128 else 1
    big = image_size * ss
    img = Image.fromarray(_background(spec, image_size, nrng))
    if ss > 1:
        img = img.resize((big, big), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(img)
    for o in spec.objects:
        jitter = nrng.integers(-12, 13, 3).tolist()
        fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLOURS[o.colour], jitter))
        _draw_shape(d, o.shape, o.x * big, o.y * big, SIZES[o.size] * big / 2 * (1 + nrng.uniform(-0.06, 0.06)), fill)
    if ss > 1:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return img


# ----------------------------------------------------------------------------- dataset
class ScenesDataset(PairSource):
    """Map-style captioned scenes: sample ``i`` of ``(split, seed)`` is always the same.

    The train split draws objects only from :data:`TRAIN_COMBOS`; val and test use all combos.
    """

    is_map_style = True

    def __init__(self, split: str = "train", n: int = 20000, seed: int = 0, image_size: int = 64) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"scenes split must be one of {SPLITS}, got {split!r}")
        if n < 1:
            raise ValueError(f"scenes: n must be >= 1, got {n}")
        if image_size < 16:
            raise ValueError(f"scenes: image_size must be >= 16, got {image_size}")
        self.split, self.n, self.seed, self.image_size = split, int(n), int(seed), int(image_size)
        self.num_samples = self.n
        self.combos = TRAIN_COMBOS if split == "train" else ALL_COMBOS
        self.spec = f"builtin:scenes?split={split}&n={n}&seed={seed}&size={image_size}"
        self.name = f"scenes-{split}"

    def scene(self, i: int) -> SceneSpec:
        """The spec (objects, background) of scene ``i``, without rendering it."""
        if not 0 <= i < self.n:
            raise IndexError(f"scene index {i} out of range for {self.n} scenes")
        return make_scene(stable_rng("scenes", self.seed, self.split, i), self.combos)

    def get(self, i: int) -> Sample:
        if i < 0:
            i += self.n
        spec = self.scene(i)
        return Sample(key=f"scenes/{self.split}/{self.seed}/{i}", image=render_scene(spec, self.image_size),
                      captions=scene_captions(spec), meta=_meta(spec, self.split, i))


def _meta(spec: SceneSpec, split: str, i: int) -> dict:
    objects = [{"colour": o.colour, "shape": o.shape, "size": o.size, "x": o.x, "y": o.y} for o in spec.objects]
    return {"split": split, "index": i, "kind": spec.kind, "background": spec.background, "texture": spec.texture,
            "relation": spec.relation, "objects": objects}


# ----------------------------------------------------------------------------- evaluation sets
@dataclass
class ClassificationTask:
    """A zero-shot classification task: images, integer labels, class names and prompt templates."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    specs: list[SceneSpec] | None = field(default=None, repr=False)  # what each image shows

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classnames)

    def __len__(self) -> int:
        return len(self.images)


def _task(name: str, seed: int, n_per_class: int, image_size: int, classnames: list[str],
          templates: list[str], make, images_of: str | None = None) -> ClassificationTask:
    """``images_of``: draw the images of that task instead (same images, other prompts)."""
    images, labels, specs = [], [], []
    for label in range(len(classnames)):
        for k in range(n_per_class):
            spec = make(stable_rng("scenes-task", images_of or name, seed, label, k), label)
            images.append(render_scene(spec, image_size))
            labels.append(label)
            specs.append(spec)
    return ClassificationTask(name, images, np.asarray(labels, dtype=np.int64), classnames, templates, specs)


def _seen_control_combos() -> list[tuple[str, str]]:
    """A fixed set of seen combos, as many as held out, for comparing seen vs unseen accuracy."""
    return sorted(stable_rng("seen-combos").sample(list(TRAIN_COMBOS), len(HELDOUT_COMBOS)))


def scene_tasks(seed: int = 0, n_per_class: int = 50, image_size: int = 64,
                names: list[str] | None = None) -> dict[str, ClassificationTask]:
    """Zero-shot tasks on fresh scenes (independent of every split's scenes):

    - ``heldout_colour_shape``: one object of a held-out colour-shape combo, classes "red triangle"...
    - ``seen_colour_shape``: the same on as many combos seen in training (the control).
    - ``counting``: 1, 2 or 3 identical objects, classes "one object" / "two objects" / "three objects"
      with the prompt "a picture of {}." (the training captions' count phrasing).
    - ``position``: a red circle and a blue square; classes: where the red circle is, "on the left" /
      "on the right" / "at the top" / "at the bottom" (prompt "the red circle is {}").
    - ``relation``: the same images as ``position``; classes: the red circle is "to the left of" / "to the right of" /
      "above" / "below" the blue square (prompt "a red circle {} a blue square"). Training
      captions say each arrangement both ways ("a blue square to the right of a red circle"), so
      a bag-of-words text encoder tops out at 50% here (it gets the axis); beyond that needs word order.

    ``names`` restricts which tasks are generated (all by default).
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    cs_templates = ["a photo of a {}.", "a {}"]

    def single(combos):
        return lambda rng, label: finish_scene(rng, "single", single_objects(rng, combos[label]))

    held = list(HELDOUT_COMBOS)
    seen = _seen_control_combos()

    def counting(rng, label):
        combo = rng.choice(TRAIN_COMBOS)
        if label == 0:
            return finish_scene(rng, "single", single_objects(rng, combo))
        return finish_scene(rng, "count", count_objects(rng, combo, label + 1))

    (ca, sa), (cb, sb) = POSITION_PAIR
    rels = [("left", False), ("left", True), ("above", False), ("above", True)]

    def position(rng, label):
        rel, swap = rels[label]
        a, b = POSITION_PAIR
        objs = relation_objects(rng, b, a, rel) if swap else relation_objects(rng, a, b, rel)
        return finish_scene(rng, "relation", objs, rel)

    makers = {
        "heldout_colour_shape": lambda: _task("heldout_colour_shape", seed, n_per_class, image_size,
                                              [f"{c} {s}" for c, s in held], cs_templates, single(held)),
        "seen_colour_shape": lambda: _task("seen_colour_shape", seed, n_per_class, image_size,
                                           [f"{c} {s}" for c, s in seen], cs_templates, single(seen)),
        "counting": lambda: _task("counting", seed, n_per_class, image_size,
                                  ["one object", "two objects", "three objects"], ["a picture of {}."], counting),
        "position": lambda: _task("position", seed, n_per_class, image_size,
                                  ["on the left", "on the right", "at the top", "at the bottom"],
                                  [f"the {ca} {sa} is {{}}"], position),
        "relation": lambda: _task("relation", seed, n_per_class, image_size,
                                  ["to the left of", "to the right of", "above", "below"],
                                  [f"a {ca} {sa} {{}} a {cb} {sb}"], position, images_of="position"),
    }
    wanted = list(makers) if names is None else list(names)
    unknown = [n for n in wanted if n not in makers]
    if unknown:
        raise ValueError(f"unknown scene task(s) {unknown}; available: {', '.join(makers)}")
    return {n: makers[n]() for n in wanted}


SCENE_TASKS = ("heldout_colour_shape", "seen_colour_shape", "counting", "position", "relation")


def scene_retrieval_set(n: int = 500, seed: int = 0, image_size: int = 64
                        ) -> tuple[list[Image.Image], list[list[str]]]:
    """``n`` test-split scenes with their most specific captions. Scenes whose caption was
    already used by an earlier scene are passed over, so every caption has exactly one
    matching image (a fair ground truth for text-to-image recall)."""
    ds = ScenesDataset("test", n=10**9, seed=seed, image_size=image_size)
    images, captions, used = [], [], set()
    for i in itertools.count():
        spec = ds.scene(i)
        caps = retrieval_captions(spec)
        if used.intersection(caps):
            continue
        used.update(caps)
        images.append(render_scene(spec, image_size))
        captions.append(caps)
        if len(images) == n:
            return images, captions
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- re-arranged scenes
def swap_positions(spec: SceneSpec) -> SceneSpec | None:
    """The re-arranged scene of a relation scene: its two objects trade places (each keeps its
    colour, shape and size), so every relation caption flips ("a red circle to the left of a blue
    square" -> "... to the right of ..."); ``objects[0]`` stays the left / top one, as the
    captions require. ``None`` for other kinds (moving identical or listed objects changes no
    caption, so the result would be a duplicate, not a negative)."""
    if spec.kind != "relation":
        return None
    a, b = spec.objects
    return dataclasses.replace(spec, objects=(dataclasses.replace(b, x=a.x, y=a.y),
                                              dataclasses.replace(a, x=b.x, y=b.y)))


def relation_caption(spec: SceneSpec, first: tuple[str, str]) -> str:
    """The relation caption of a two-object scene that names the object ``first`` (colour, shape)
    first: "a red circle to the left of a blue square" (one of :func:`scene_captions`)."""
    a, b = spec.objects
    fwd, back = RELATIONS[spec.relation or "left"]
    if (a.colour, a.shape) == first:
        return f"a {a.name} {fwd} a {b.name}"
    if (b.colour, b.shape) == first:
        return f"a {b.name} {back} a {a.name}"
    raise ValueError(f"scene has no {first[0]} {first[1]}")


def parse_scenes_query(spec: str) -> dict[str, str]:
    """``builtin:scenes?n=20000&size=64`` -> {"n": "20000", "size": "64"}."""
    from urllib.parse import parse_qsl

    _, _, query = spec.partition("?")
    try:
        return dict(parse_qsl(query, keep_blank_values=False, strict_parsing=bool(query)))
    except ValueError:
        raise ValueError(f"malformed builtin spec {spec!r}: expected builtin:NAME?key=value&key=value") from None


__all__ = ["ScenesDataset", "SceneSpec", "SceneObject", "ClassificationTask", "scene_tasks", "scene_retrieval_set",
           "scene_captions", "retrieval_captions", "render_scene", "make_scene", "COLOURS", "SHAPES", "SIZES",
           "BACKGROUNDS", "HELDOUT_COMBOS", "TRAIN_COMBOS", "ALL_COMBOS", "SCENE_TASKS", "RELATION_POOL",
           "swap_positions", "relation_caption", "single_objects", "relation_objects", "count_objects", "finish_scene"]
