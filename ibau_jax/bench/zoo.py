"""The model zoo: poisoned models a benchmark defends, each with its training record.

    ZOO/NAME/record.json   {"name", "kind": "import" | "trained", "spec", "dataset", "attack",
                            "target", "poison_ratio", "epochs", "clean_acc", "asr", ...}
    ZOO/NAME/run/          a trained model's run directory (``ibau-jax attack``'s format:
                           one checkpoint step per epoch, model.npz, run.json)

An entry is either

* imported: an authors' PyTorch checkpoint (``checkpoint = "{shared}/.../badnets_8_02_ckpt.pth"``),
  read through ``checkpoints.load_model`` (the restricted loader) every time it is used; the
  record keeps its path and sha256 (a changed file is refused), or
* trained from its ``[models.NAME.train]`` spec by the existing attack code (CIFAR-10 / GTSRB:
  ``ibau-jax attack``'s ``cmd_attack`` (handed in by the CLI); digits: the demo's data
  and ``training.train``) into ``ZOO/NAME/run`` (safe ``.npz`` weights), resumable: an
  interrupted training continues from its last finished epoch.

An entry whose ``record.json`` exists is reused; one whose spec changed is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from .. import models, results
from ..errors import ConfigError, UserError
from .config import DIGITS_CLEAN_POOL, DIGITS_TEST, TRAIN_DEFAULTS, ModelSpec


RECORD = "record.json"
RUN = "run"
DIGITS_SPLIT_SEED = 0  # the permutation of the digits (``data.digits.load_digits_32``)


class ZooError(UserError):
    """A zoo entry that is missing, corrupt or made from another spec."""


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A ready zoo entry: where its weights are and what its training record says."""

    spec: ModelSpec
    record: dict[str, Any]
    run_dir: Path | None       # trained entries
    checkpoint: Path | None    # imported entries


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    """What identifies a zoo entry (paths to data excluded: the same data may live elsewhere)."""
    d = {k: v for k, v in dataclasses.asdict(spec).items()
         if k not in ("name", "data_dir", "trigger_dir", "checkpoint")}
    if not d["attack_options"]:
        del d["attack_options"]  # absent when none: entries and records made before the key stay valid
    if spec.train is not None:
        d["train"] = {**TRAIN_DEFAULTS, **spec.train}
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_dir(zoo: str | Path, spec: ModelSpec) -> Path:
    return Path(zoo) / spec.name


def _read_record(path: Path) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path} is corrupt ({e}); delete it (the training run beside it resumes)") from None
    if not isinstance(rec, dict) or "spec" not in rec:
        raise ZooError(f"{path} is not a zoo record; delete it (the training run beside it resumes)")
    return rec


def lookup(zoo: str | Path, spec: ModelSpec) -> ZooModel | None:
    """The ready entry for ``spec``, None when it is not built yet; ZooError when ``zoo`` holds
    an entry of that name made from another spec, or an imported file changed."""
    d = entry_dir(zoo, spec)
    if not (d / RECORD).exists():
        return None
    rec = _read_record(d / RECORD)
    if rec["spec"] != spec_dict(spec):
        raise ZooError(f"zoo entry {d} was made from another spec ({rec['spec']}); delete {d} to rebuild it "
                       f"or give the model another name")
    if spec.kind == "import":
        return ZooModel(spec, rec, None, Path(spec.checkpoint))
    return ZooModel(spec, rec, d / RUN, None)


def ensure(zoo: str | Path, spec: ModelSpec, *, quiet: bool = False, log=print, commands: Any = None) -> ZooModel:
    """The entry for ``spec``: reused, imported, or trained (resuming a started run) now."""
    ready = lookup(zoo, spec)
    if ready is not None:
        return ready
    d = entry_dir(zoo, spec)
    results.check_writable(d / RECORD, "zoo")
    t0 = time.perf_counter()
    base = {"name": spec.name, "kind": spec.kind, "spec": spec_dict(spec), "dataset": spec.dataset,
            "attack": spec.attack, "target": spec.target, "poison_ratio": spec.poison_ratio}
    if spec.kind == "import":
        src = Path(spec.checkpoint)
        if not src.is_file():
            raise ZooError(f"[models.{spec.name}]: checkpoint {src} not found; set IBAU_SHARED to the shared "
                           "data folder or fix the path")
        from .. import checkpoints
        checkpoints.load_model(src, spec.arch)  # refuses a corrupt or wrong file now, not mid-run
        rec = {**base, "source": str(src), "sha256": _sha256(src), "epochs": None, "clean_acc": None, "asr": None,
               "note": "imported; its accuracy and ASR are each cell's 'before'"}
    else:
        history = _train(spec, d / RUN, quiet=quiet, log=log, commands=commands)
        last = history[-1] if history else {}
        rec = {**base, "epochs": spec_dict(spec)["train"]["epochs"], "clean_acc": last.get("clean_acc"),
               "asr": last.get("asr_all"), "asr_nontarget": last.get("asr_nontarget"),
               "train_seconds": round(time.perf_counter() - t0, 1), "last_epoch": last}
    results.write_atomic(d / RECORD, results.dumps(rec))
    return ZooModel(spec, rec, d / RUN if spec.kind == "trained" else None,
                    Path(spec.checkpoint) if spec.kind == "import" else None)


def _train(spec: ModelSpec, run_dir: Path, *, quiet: bool, log, commands: Any) -> list[dict[str, Any]]:
    """Train ``spec`` into ``run_dir`` (resuming it when it exists); the training history.
    CIFAR-10 / GTSRB go through ``commands.cmd_attack`` (``runner.Commands``: the CLI's)."""
    from .. import training

    t = spec_dict(spec)["train"]
    resume = run_dir.exists()
    log(f"zoo: {'resuming' if resume else 'training'} {spec.name} ({spec.attack} -> {spec.target}, "
        f"{spec.dataset}, {t['epochs']} epochs) in {run_dir}")
    if spec.dataset == "digits":
        _train_digits(spec, t, run_dir, resume=resume, quiet=quiet)
    else:
        if commands is None:
            raise TypeError("training a CIFAR-10/GTSRB zoo model needs the command layer (commands=)")
        lr = t["lr"] if t["lr"] is not None else (0.05 if t["optimizer"] == "sgd" else 1e-3)
        args = argparse.Namespace(
            command="attack", dataset=spec.dataset, data_dir=spec.data_dir, no_download=True, data_source="auto",
            attack=spec.attack, attack_option=spec.attack_options, trigger_dir=spec.trigger_dir, target=spec.target,
            poison_ratio=spec.poison_ratio, model=spec.arch, epochs=t["epochs"], train_limit=t["train_limit"],
            batch_size=t["batch_size"],
            optimizer=t["optimizer"], lr=lr, weight_decay=t["weight_decay"], eval_every=max(1, t["epochs"] // 5),
            seed=t["seed"], out=str(run_dir), resume=resume, quiet=quiet, dp_noise=None, dp_clip=None)
        commands.validate(args)
        if commands.cmd_attack(args) == 130:
            raise KeyboardInterrupt
    return list(training.read_run(run_dir)["history"])


def digits_data():
    """The digits split every digits cell and zoo model uses (``load_digits_32(0, 300, 300)``)."""
    from ..data import digits

    return digits.load_digits_32(DIGITS_SPLIT_SEED, DIGITS_CLEAN_POOL, DIGITS_TEST)


def _train_digits(spec: ModelSpec, t: dict[str, Any], run_dir: Path, *, resume: bool, quiet: bool) -> None:
    """The demo's recipe (``demo.run_demo``) with the spec's attack, in a resumable run directory."""
    from .. import attacks, interrupt, rng, training

    d = digits_data()
    streams = rng.streams(t["seed"])
    attack = attacks.make_attack(spec.attack, num_classes=d.num_classes, target=spec.target,
                                 seed=streams.seed_of("trigger"), **spec.attack_options)
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, spec.poison_ratio, streams.seed_of("poison"))
    asr_x, asr_t, _ = attacks.asr_test_set(d.test_x, d.test_y, attack)
    eval_sets = training.EvalSets(d.test_x, d.test_y, asr_x, asr_t, attacks.asr_true_labels(d.test_y, attack))
    x, y = poisoned.x, poisoned.y
    if t["train_limit"]:
        x, y = x[: t["train_limit"]], y[: t["train_limit"]]
    config = training.TrainConfig(epochs=t["epochs"], batch_size=t["batch_size"], optimizer=t["optimizer"],
                                  lr=t["lr"] if t["lr"] is not None else 0.02, weight_decay=t["weight_decay"],
                                  crop_pad=2, flip=False, seed=t["seed"], eval_every=t["epochs"])
    run_config = {"dataset": "digits", "attack": spec.attack, "target": attack.target,
                  "poison_ratio": spec.poison_ratio, "model": spec.arch, "train_limit": t["train_limit"],
                  "n_train": int(len(y)), "trigger_seed": streams.seed_of("trigger")}
    if spec.attack_options:
        run_config["attack_options"] = spec.attack_options
    meta = {"model": spec.arch, "num_classes": d.num_classes, "dataset": "digits", "attack": spec.attack,
            "target": attack.target, "poison_ratio": spec.poison_ratio}
    model = models.get_model(spec.arch, d.num_classes)
    try:
        with interrupt.graceful("stopping after the epoch in progress (Ctrl-C again to abandon it now)"):
            training.train(model, x, y, config, eval_sets=eval_sets, run_dir=run_dir, run_config=run_config,
                           meta=meta, resume=resume, quiet=quiet, log=lambda s: None)
    except interrupt.Interrupted:
        raise KeyboardInterrupt from None
