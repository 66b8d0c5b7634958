"""Prompt templates and class names for zero-shot heads.

Built-in sets are the paper's (OpenAI CLIP, MIT; see ``assets/zeroshot/LICENSE.txt``): the 80
ImageNet templates and 1,000 cleaned class names, and the class names/templates of ``prompts.md``
for CIFAR-10/100, MNIST, STL-10, EuroSAT, Food-101, Pets, Flowers-102, ... A class may be a list
of synonyms (FER2013); the zero-shot head then ensembles over every name x template.

Templates use ``{}`` for the class name; CLIP_benchmark's ``{c}`` is accepted too. Each packaged
class list states the label order it assumes (``label_order``; OpenAI's order, which for pets,
eurosat, fer2013 and clevr_counts differs from torchvision's / CLIP_benchmark's), and may list
the dataset's own label names (``label_names``, e.g. EuroSAT's folder names) so datasets whose
labels are named can be matched by name instead of by position (:func:`match_by_name`).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

from ..utils import read_json

ClassName = Union[str, list[str]]

# The template used when nothing says which set fits a dataset (see resolve_templates in tasks).
GENERIC_TEMPLATE = "a photo of a {}."
# Generic template sets that are not tied to a dataset.
GENERIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "photo": ("a photo of a {}.",),
    "none": ("{}",),
}
# Alternative spellings of the packaged dataset sets.
ALIASES: dict[str, str] = {
    "satellite": "eurosat", "oxford_pets": "pets", "oxfordpets": "pets", "flowers": "flowers102",
    "food": "food101", "imagenet7": "imagenet_top7", "imagenet_7": "imagenet_top7", "textures": "dtd",
    "describabletextures": "dtd", "aircraft": "fgvc_aircraft", "patchcamelyon": "pcam",
    "fer": "fer2013", "clevr": "clevr_counts", "pascalvoc2007": "voc2007", "cifar": "cifar10",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9_]", "", name.lower().replace("-", "_"))


@lru_cache(maxsize=None)
def _builtin_files() -> dict[str, str]:
    root = resources.files("clipforge") / "assets" / "zeroshot"
    return {p.name[:-5]: p.name for p in root.iterdir() if p.name.endswith(".json")}


@lru_cache(maxsize=64)
def _builtin(name: str) -> dict:
    fname = _builtin_files()[name]
    return json.loads((resources.files("clipforge") / "assets" / "zeroshot" / fname).read_text(encoding="utf-8"))


def _resolve(name: str) -> str | None:
    key = _norm(name)
    key = ALIASES.get(key, key)
    return key if key in _builtin_files() else None


def available_prompt_sets() -> dict[str, dict[str, int]]:
    """Built-in sets: ``{name: {"classes": C, "templates": T}}`` (C = 0 for template-only sets)."""
    out = {n: {"classes": 0, "templates": len(t)} for n, t in GENERIC_TEMPLATES.items()}
    for name in sorted(_builtin_files()):
        d = _builtin(name)
        out[name] = {"classes": len(d.get("classes", [])), "templates": len(d.get("templates", []))}
    return out


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1)
            if ln.strip() and not ln.lstrip().startswith("#")]


def _looks_like_path(spec: str) -> bool:
    return any(c in spec for c in "/\\") or Path(spec).suffix.lower() in (".txt", ".json", ".tsv", ".csv")


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Templates from a built-in set name, a text file (one template per line with ``{}``;
    blank lines and ``#`` comments skipped), a JSON file (list, or object with "templates"),
    or an explicit list. Every template must contain ``{}`` exactly once."""
    if not isinstance(spec, str):
        templates, where = [str(t) for t in spec], "template list"
        lines = list(enumerate(templates, 1))
    elif spec.lower() in GENERIC_TEMPLATES:
        return list(GENERIC_TEMPLATES[spec.lower()])
    elif Path(spec).is_file():
        where = spec
        if spec.lower().endswith(".json"):
            obj = read_json(spec)
            obj = obj.get("templates") if isinstance(obj, dict) else obj
            if not isinstance(obj, list):
                raise ValueError(f"{spec}: expected a JSON list of templates or an object with a 'templates' list")
            lines = list(enumerate((str(t) for t in obj), 1))
        else:
            lines = _read_lines(Path(spec))
    elif (name := _resolve(spec)) is not None and "templates" in _builtin(name):
        return list(_builtin(name)["templates"])
    else:
        if _looks_like_path(spec):
            raise FileNotFoundError(f"template file not found: {spec}")
        raise ValueError(f"unknown template set {spec!r}; built-in sets: "
                         f"{', '.join(available_prompt_sets())} (or pass a file with one template per line)")
    out = []
    for lineno, t in lines:
        if "{}" not in t and t.count("{c}") == 1:  # CLIP_benchmark's spelling
            t = t.replace("{c}", "{}")
        if t.count("{}") != 1:
            raise ValueError(f"{where}: template {lineno} ({t!r}) must contain '{{}}' (or '{{c}}') exactly once")
        out.append(t)
    if not out:
        raise ValueError(f"{where}: no templates found")
    return out


def load_classnames(spec: str | Sequence[ClassName]) -> list[ClassName]:
    """Class names from a built-in set name (``imagenet``, ``cifar10``, ...), a text file (one
    class per line; ``a | b`` gives synonyms), a JSON file (list, or object with "classes"), or a list."""
    if not isinstance(spec, str):
        return [c if isinstance(c, str) else [str(s) for s in c] for c in spec]
    p = Path(spec)
    if p.is_file():
        if p.suffix.lower() == ".json":
            obj = read_json(p)
            obj = obj.get("classes") if isinstance(obj, dict) else obj
            if not isinstance(obj, list):
                raise ValueError(f"{p}: expected a JSON list of class names or an object with a 'classes' list")
            return load_classnames(obj)
        out: list[ClassName] = []
        for _, ln in _read_lines(p):
            parts = [s.strip() for s in ln.split("|") if s.strip()]
            out.append(parts[0] if len(parts) == 1 else parts)
        if not out:
            raise ValueError(f"{p}: no class names found")
        return out
    name = _resolve(spec)
    if name is not None and "classes" in _builtin(name):
        return load_classnames(_builtin(name)["classes"])
    if _looks_like_path(spec):
        raise FileNotFoundError(f"class-name file not found: {spec}")
    sets = [n for n, v in available_prompt_sets().items() if v["classes"]]
    raise ValueError(f"unknown class-name set {spec!r}; built-in: {', '.join(sets)} (or pass a file, one name per line)")


def match_prompt_set(dataset_name: str | None) -> str | None:
    """The built-in set whose name best matches a dataset name (``cifar10_test`` -> ``cifar10``):
    the longest built-in name that the normalised dataset name starts with, or None."""
    if not dataset_name:
        return None
    key = _norm(Path(str(dataset_name)).name).replace("_", "")
    if key.startswith("builtin"):
        return None
    best = None
    names = list(_builtin_files()) + [a for a in ALIASES if len(a) >= 6]  # short aliases match too much
    for n in names:
        nn = n.replace("_", "")
        if key.startswith(nn) and (best is None or len(nn) > len(best.replace("_", ""))):
            best = n
    if best is None:
        return None
    return ALIASES.get(best, best)


def builtin_set_info(spec: Any) -> dict[str, Any] | None:
    """The packaged JSON behind a built-in set name (None for files, lists and unknown names)."""
    if not isinstance(spec, str) or Path(spec).is_file():
        return None
    name = _resolve(spec)
    return None if name is None else {"set": name, **_builtin(name)}


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def match_by_name(dataset_names: Sequence[str], classnames: Sequence[ClassName],
                  label_names: Sequence[str] | None = None, *, source: str = "class names") -> list[int] | None:
    """Map a dataset's named labels onto ``classnames`` by name, so a list in another label order
    cannot silently mislabel: returns ``perm`` with dataset label ``k`` <-> ``classnames[perm[k]]``,
    or ``None`` when position must be used (no name matches: a different vocabulary such as
    WordNet ids, or unnamed labels "0".."n-1"). Names compare case-, space- and
    punctuation-insensitively against every synonym and the set's ``label_names``. Raises
    ``ValueError`` when some names match in an order that contradicts the positions."""
    if len(dataset_names) != len(classnames):
        return None
    if list(dataset_names) == [str(i) for i in range(len(dataset_names))]:
        return None  # unnamed labels
    keys: list[set[str]] = []
    for c, cn in enumerate(classnames):
        ks = {_key(n) for n in class_texts(cn)}
        if label_names is not None and c < len(label_names):
            ks.add(_key(label_names[c]))
        keys.append(ks)
    matched: dict[int, int] = {}
    for k, name in enumerate(dataset_names):
        hits = [c for c, ks in enumerate(keys) if _key(name) in ks]
        if len(hits) == 1:
            matched[k] = hits[0]
    if not matched:
        return None
    if len(matched) == len(dataset_names) and len(set(matched.values())) == len(matched):
        return [matched[k] for k in range(len(dataset_names))]
    wrong = [(k, c) for k, c in matched.items() if k != c]
    if not wrong:
        return None  # partial matches, all at their own positions: positions agree
    k, c = wrong[0]
    raise ValueError(f"{source}: dataset class {k} ({dataset_names[k]!r}) matches class {c} "
                     f"({display_name(classnames[c])!r}) by name, but only {len(matched)} of {len(dataset_names)} "
                     "names match; give class names in the dataset's label order (one per label) or matching names")


def class_texts(classname: ClassName) -> list[str]:
    """The names (synonyms) of one class."""
    return [classname] if isinstance(classname, str) else list(classname)


def display_name(classname: ClassName) -> str:
    return classname if isinstance(classname, str) else classname[0]
