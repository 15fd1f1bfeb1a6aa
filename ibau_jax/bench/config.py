"""A benchmark config: TOML read with ``tomllib``, a profile applied, every name validated.

    name = "smoke"                    # the results' title
    zoo = "runs/zoo"                  # where poisoned models are kept (relative to the working dir)
    seeds = [0]                       # the defense's PRNGKey(seed)
    n_clean = [300]                   # clean-set sizes (the "setting" axis)
    eval_every = 1                    # rounds between evaluations in a cell (the last always)

    [models.badnets]                  # a poisoned model: imported ...
    dataset = "cifar10"
    checkpoint = "{shared}/ibau-original/checkpoints/badnets_8_02_ckpt.pth"
    attack = "badnets"
    target = 8
    poison_ratio = 0.2

    [models.blend]                    # ... or trained (``[models.NAME.train]``) into the zoo
    dataset = "digits"
    attack = "blend"
    target = 0
    poison_ratio = 0.1
    arch = "small_vgg_narrow"
    train = { epochs = 5, batch_size = 64, lr = 0.02 }

    [defenses.ibau]                   # a registered defense; its keys are ``--set`` overrides
    rounds = 2
    [defenses.ibau_r5]                # another label for the same defense
    defense = "ibau"
    rounds = 5

    [profile.cpu]                     # ``--profile cpu``: replaces top-level keys, merges tables
    seeds = [0]
    [profile.cpu.defenses.ibau]
    rounds = 1

``{shared}`` in a path is ``$IBAU_SHARED`` (default ``../shared``). Everything is checked in
:func:`load` before any data is read or program compiled: unknown keys, datasets, attacks,
model architectures, defenses and defense fields are one-line ``ConfigError`` s naming the
valid choices.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DATASETS = ("digits", "cifar10", "gtsrb")
PROFILES = ("full", "cpu")
TOP_KEYS = {"name", "description", "zoo", "seeds", "n_clean", "eval_every", "models", "defenses", "profile", "data"}
MODEL_KEYS = {"dataset", "attack", "target", "poison_ratio", "checkpoint", "arch", "train", "attack_options",
              "trigger_dir", "data_dir", "description"}
TRAIN_KEYS = {"epochs", "batch_size", "lr", "optimizer", "weight_decay", "seed", "train_limit"}
DEFAULT_DATA_DIRS = {"cifar10": "{shared}/datasets/cifar10", "gtsrb": "{shared}/datasets/gtsrb"}
DEFAULT_TRIGGER_DIR = "{shared}/ibau-original/triggers"
TRAIN_DEFAULTS = {"epochs": 30, "batch_size": 128, "lr": None, "optimizer": "sgd", "weight_decay": 5e-4,
                  "seed": 0, "train_limit": 0}
DIGITS_ARCH = "small_vgg_narrow"  # the demo's narrow VGG (models.MODELS): digits models train in seconds
DIGITS_CLEAN_POOL = 300   # digits: the defender's pool and the test set (``data.digits.load_digits_32``)
DIGITS_TEST = 300


def shared_root() -> Path:
    """``$IBAU_SHARED`` or ``../shared`` (the shared data beside the checkout)."""
    return Path(os.environ.get("IBAU_SHARED", "../shared"))


def expand(path: str | None) -> str | None:
    """``{shared}`` in ``path`` replaced by :func:`shared_root`."""
    return None if path is None else path.replace("{shared}", str(shared_root()))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One poisoned model of the grid (a zoo entry): imported (``checkpoint``) or trained (``train``)."""

    name: str
    dataset: str
    attack: str
    target: int
    poison_ratio: float | None
    arch: str = "small_vgg"
    checkpoint: str | None = None          # an authors' checkpoint to import (expanded path)
    train: dict[str, Any] | None = None    # a training spec (``TRAIN_KEYS``)
    data_dir: str | None = None
    trigger_dir: str | None = None
    attack_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the attack builder's options

    @property
    def kind(self) -> str:
        return "import" if self.checkpoint else "trained"


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """One column: ``label`` runs the registered ``defense`` with ``overrides`` (``--set`` style)."""

    label: str
    defense: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    profile: str
    zoo: str
    seeds: tuple[int, ...]
    n_clean: tuple[int, ...]
    models: tuple[ModelSpec, ...]
    defenses: tuple[DefenseSpec, ...]
    source: str                   # the config file
    resolved: dict[str, Any]      # the profile-applied TOML (what the fingerprint hashes)
    description: str = ""
    only_models: tuple[str, ...] | None = None     # run a subset (--models / --defenses)
    only_defenses: tuple[str, ...] | None = None
    eval_every: int = 1           # rounds between evaluations in a cell (the last always)

    @property
    def fingerprint(self) -> str:
        """sha256 of the resolved config (profile applied), canonical JSON: a results dir's identity."""
        text = json.dumps({"profile": self.profile, "config": self.resolved}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def defense(self, label: str) -> DefenseSpec:
        return next(d for d in self.defenses if d.label == label)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge recursively, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _unknown(where: str, keys: Any, valid: Any) -> None:
    bad = sorted(set(keys) - set(valid))
    if bad:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(bad)}; valid fields: {', '.join(sorted(valid))}")


def _ints(where: str, v: Any, low: int) -> tuple[int, ...]:
    vals = v if isinstance(v, list) else [v]
    if not vals or any(type(x) is not int or x < low for x in vals):
        raise ConfigError(f"{where} must be a non-empty list of integers >= {low}, got {v!r}")
    return tuple(vals)


def _model(name: str, t: Any) -> ModelSpec:
    from .. import attacks, models

    where = f"[models.{name}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where} must be a table")
    _unknown(where, t, MODEL_KEYS)
    for key in ("dataset", "attack", "target"):
        if key not in t:
            raise ConfigError(f"{where} needs {key!r}")
    if t["dataset"] not in DATASETS:
        raise ConfigError(f"{where}: unknown dataset {t['dataset']!r}; choose one of {', '.join(DATASETS)}")
    if t["attack"] not in attacks.ATTACK_NAMES:
        raise ConfigError(f"{where}: unknown attack {t['attack']!r}; registered attacks: "
                          f"{', '.join(attacks.ATTACK_NAMES)}")
    arch = t.get("arch", DIGITS_ARCH if t["dataset"] == "digits" else "small_vgg")
    if arch not in models.MODELS:
        raise ConfigError(f"{where}: unknown arch {arch!r}; choose one of {', '.join(sorted(models.MODELS))}")
    if type(t["target"]) is not int or t["target"] < 0:
        raise ConfigError(f"{where}: target must be a class id >= 0, got {t['target']!r}")
    if ("checkpoint" in t) == ("train" in t):
        raise ConfigError(f"{where}: give exactly one of checkpoint = \"FILE\" (import) or "
                          "[models.NAME.train] (train into the zoo)")
    train = t.get("train")
    if train is not None:
        if not isinstance(train, dict):
            raise ConfigError(f"{where}.train must be a table")
        _unknown(f"{where}.train", train, TRAIN_KEYS)
        if t["dataset"] == "gtsrb" and not t.get("data_dir"):
            raise ConfigError(f"{where}: training on GTSRB needs data_dir (a folder with train_roi32.npz "
                              "or the official archive)")
    if t["dataset"] == "digits" and "checkpoint" in t:
        raise ConfigError(f"{where}: digits models are trained into the zoo; remove checkpoint")
    ratio = t.get("poison_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ConfigError(f"{where}: poison_ratio must be in (0, 1], got {ratio!r}")
    if train is not None and ratio is None:
        raise ConfigError(f"{where}: a trained model needs poison_ratio")
    options = t.get("attack_options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.attack_options must be a table, e.g. attack_options = {{ delta = 0.157 }}")
    try:
        options = attacks.parse_options(t["attack"], options)
    except attacks.AttackError as e:
        raise ConfigError(f"{where}: {e}") from None
    data_dir = t.get("data_dir", DEFAULT_DATA_DIRS.get(t["dataset"]))
    spec = ModelSpec(name=name, dataset=t["dataset"], attack=t["attack"], target=t["target"],
                     poison_ratio=ratio, arch=arch, checkpoint=expand(t.get("checkpoint")), train=train,
                     data_dir=expand(data_dir), trigger_dir=expand(t.get("trigger_dir", DEFAULT_TRIGGER_DIR)),
                     attack_options=options)
    check_train_spec(spec)
    return spec


def _defense(label: str, t: Any, build: bool = True) -> DefenseSpec:
    from .. import defenses

    where = f"[defenses.{label}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where} must be a table of the defense's config fields")
    overrides = {k: v for k, v in t.items() if k != "defense"}
    name = t.get("defense", label)
    if name not in defenses.names():
        raise ConfigError(f"{where}: unknown defense {name!r}; registered defenses: {', '.join(defenses.names())}")
    try:
        if build:
            defenses.get(name, **overrides)  # builds (validates) the config; compiles nothing
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: defense {name!r} is registered but its module is not installed ({e}); "
                          "leave it out with --defenses") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return DefenseSpec(label, name, overrides)


def parse(raw: dict[str, Any], *, profile: str = "full", source: str = "<config>",
          only_models: list[str] | None = None, only_defenses: list[str] | None = None) -> BenchConfig:
    """A :class:`BenchConfig` from a parsed TOML dict; ConfigError on anything unknown or out of range.

    ``only_models`` / ``only_defenses``: run a subset (the fingerprint stays the whole config's)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    _unknown(source, raw, TOP_KEYS)
    profiles = raw.get("profile", {})
    _unknown(f"{source} [profile]", profiles, PROFILES)
    resolved = {k: v for k, v in raw.items() if k != "profile"}
    if profile in profiles:
        _unknown(f"{source} [profile.{profile}]", profiles[profile], TOP_KEYS - {"profile"})
        resolved = _merge(resolved, profiles[profile])
    if not resolved.get("models"):
        raise ConfigError(f"{source}: no [models.NAME] tables; add at least one poisoned model")
    if not resolved.get("defenses"):
        raise ConfigError(f"{source}: no [defenses.NAME] tables; add at least one defense")
    models = tuple(_model(n, t) for n, t in resolved["models"].items())
    defs = tuple(_defense(n, t, build=not only_defenses or n in only_defenses)
                 for n, t in resolved["defenses"].items())
    for what, only, have in (("--models", only_models, [m.name for m in models]),
                             ("--defenses", only_defenses, [d.label for d in defs])):
        bad = sorted(set(only or ()) - set(have))
        if bad:
            raise ConfigError(f"{what}: {', '.join(bad)} not in {source}; it has {', '.join(have)}")
    n_clean = _ints(f"{source}: n_clean", resolved.get("n_clean", [5000]), 1)
    if any(m.dataset == "digits" for m in models) and max(n_clean) > DIGITS_CLEAN_POOL:
        raise ConfigError(f"{source}: n_clean {max(n_clean)} exceeds the digits clean pool "
                          f"({DIGITS_CLEAN_POOL} images); use at most {DIGITS_CLEAN_POOL}")
    eval_every = resolved.get("eval_every", 1)
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ConfigError(f"{source}: eval_every must be an integer >= 1, got {eval_every!r}")
    cfg = BenchConfig(
        eval_every=eval_every, name=str(resolved.get("name", Path(source).stem)), profile=profile,
        zoo=str(resolved.get("zoo", "runs/zoo")), seeds=_ints(f"{source}: seeds", resolved.get("seeds", [0]), 0),
        n_clean=n_clean, models=models, defenses=defs, source=source, resolved=resolved,
        description=str(resolved.get("description", "")))
    return dataclasses.replace(cfg, only_models=tuple(only_models) if only_models else None,
                               only_defenses=tuple(only_defenses) if only_defenses else None)


def load(path: str | os.PathLike, *, profile: str = "full", only_models: list[str] | None = None,
         only_defenses: list[str] | None = None) -> BenchConfig:
    """Read and validate the TOML config at ``path`` (see the module docstring)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found; ready-made configs are in experiments/configs/") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} cannot be read ({e}); check the file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML ({e}); fix that line") from None
    return parse(raw, profile=profile, source=str(path), only_models=only_models, only_defenses=only_defenses)


def check_train_spec(spec: ModelSpec) -> None:
    """The training spec's values in range (before any data is read)."""
    if spec.train is None:
        return
    t = {**TRAIN_DEFAULTS, **spec.train}
    for k in ("epochs", "batch_size"):
        if type(t[k]) is not int or t[k] < 1:
            raise ConfigError(f"[models.{spec.name}.train]: {k} must be an integer >= 1, got {t[k]!r}")
    if t["optimizer"] not in ("sgd", "adam"):
        raise ConfigError(f"[models.{spec.name}.train]: optimizer must be sgd or adam, got {t['optimizer']!r}")
