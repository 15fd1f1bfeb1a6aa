"""The run directory: one atomic orbax checkpoint step per finished epoch, plus convenience exports.

    RUN_DIR/checkpoints/<e>/state/    params, batch_stats, opt_state, step  (orbax StandardSave)
    RUN_DIR/checkpoints/<e>/run/      the run record (orbax JsonSave): config, epochs_done, history, meta
    RUN_DIR/checkpoints/<e>/model/model.npz   the weights as ``checkpoints.save_checkpoint`` writes them
    RUN_DIR/run.json, RUN_DIR/model.npz       exports of the latest step, written after its commit

Step e (= epochs done) is written to a temporary folder and renamed into place by orbax only
once complete, so a ``kill -9`` at any moment leaves every committed step whole. Readers
(``read_run``, ``latest_model``, ``ibau-jax evaluate --model RUN_DIR``) and ``--resume`` use
only the latest committed step: the weights, the optimizer state and the record of one and
the same epoch. The exports may lag one epoch behind after an interruption (``--resume``
rewrites them first); nothing reads them back. Saving is synchronous (no threads outlive
a call) and keeps the last ``MAX_TO_KEEP`` steps.

The run config holds a fingerprint of the training data (``DATA_KEY``: sha256 of the images'
and labels' bytes); resuming with other data is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from .. import checkpoints, sharding
from ..errors import UserError

PyTree = Any

RUN_JSON = "run.json"
MODEL_NPZ = "model.npz"
CHECKPOINTS = "checkpoints"
MAX_TO_KEEP = 2
DATA_KEY = "data_sha256"      # run-config key of the training data's fingerprint
RECORD_KEYS = ("config", "epochs_done", "history", "meta")

# Test seam: called with a label after each write of ``save_epoch`` ("model" inside the orbax
# step before its commit, "commit", "export model.npz", "export run.json").
on_write: Callable[[str], None] = lambda label: None


class RunError(UserError):
    """A missing, corrupt or mismatching run directory. The message names the fix."""


# ----------------------------------------------------------------------------- the model item

class _ModelNpzHandler(ocp.CheckpointHandler):
    """Writes a step's weights as one ``save_checkpoint`` ``.npz`` inside the step (process 0)."""

    def save(self, directory, args: "ModelNpz") -> None:
        if jax.process_index() == 0:
            checkpoints.save_checkpoint(Path(directory) / MODEL_NPZ, args.variables, args.meta)
        on_write("model")

    def restore(self, directory, args: "ModelNpz | None" = None) -> tuple[dict, dict[str, Any]]:
        return checkpoints.load_checkpoint(Path(directory) / MODEL_NPZ)


@ocp.args.register_with_handler(_ModelNpzHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class ModelNpz(ocp.args.CheckpointArgs):
    variables: PyTree = None
    meta: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- helpers

def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 (hex) over the dtype, shape and bytes of x and then y (C order)."""
    h = hashlib.sha256()
    for a in (np.asarray(x), np.asarray(y)):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))  # the bytes of a.tobytes(), without the copy
    return h.hexdigest()


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run configs (sorted)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def json_ready(obj: Any) -> Any:
    """``obj`` as plain JSON types (numpy scalars -> numbers, anything else odd -> str)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # A read-only CheckpointManager logs three warnings about being read-only; they are expected.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(run_dir: Path, read_only: bool) -> ocp.CheckpointManager:
    with _quiet_absl():
        options = ocp.CheckpointManagerOptions(max_to_keep=MAX_TO_KEEP, enable_async_checkpointing=False,
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        return ocp.CheckpointManager(run_dir / CHECKPOINTS, options=options)


def _latest_step(run_dir: Path) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager on ``run_dir`` and its latest committed step; RunError when none."""
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist; train one with `ibau-jax attack --out {run_dir}`")
    if not (run_dir / CHECKPOINTS).is_dir():
        if (run_dir / RUN_JSON).exists():
            raise RunError(f"{run_dir} has {RUN_JSON} but no {CHECKPOINTS}/ folder (written by an older "
                           f"ibau-jax, or {CHECKPOINTS}/ was deleted); evaluate {run_dir / MODEL_NPZ} with "
                           "--checkpoint and --model ARCH, or train again with a new --out")
        raise RunError(f"{run_dir} is not a training run: {CHECKPOINTS}/ is missing (it is written after "
                       f"the first epoch); train with `ibau-jax attack --out {run_dir}`")
    manager = _manager(run_dir, read_only=True)
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise RunError(f"{run_dir} holds no finished epoch yet ({CHECKPOINTS}/ is empty); "
                       f"continue it with `ibau-jax attack --resume --out {run_dir}` or train again")
    return manager, step


def _corrupt(run_dir: Path, step: int, e: BaseException) -> RunError:
    return RunError(f"{run_dir}: checkpoint step {step} is corrupt ({type(e).__name__}: {e}); "
                    f"delete {run_dir / CHECKPOINTS / str(step)} to fall back to the step before it, "
                    "or delete the run directory and train again")


def _read_record(manager: ocp.CheckpointManager, run_dir: Path, step: int) -> dict[str, Any]:
    try:
        with _quiet_absl():
            record = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except Exception as e:  # orbax/json raise many types for a damaged step
        raise _corrupt(run_dir, step, e) from None
    if not isinstance(record, dict) or not set(RECORD_KEYS) <= set(record) or record["epochs_done"] != step:
        raise _corrupt(run_dir, step, ValueError(f"the run record lacks {list(RECORD_KEYS)} or is not epoch {step}"))
    return dict(record)


# ----------------------------------------------------------------------------- readers

def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The record of the latest finished epoch: ``{'config', 'epochs_done', 'history', 'meta',
    'checkpoint'}``, where ``checkpoint`` is the path of that epoch's ``model.npz`` (inside
    the same orbax step, so it holds exactly the weights the record describes).

    RunError (naming the fix) when the folder is missing, holds no finished epoch, or is corrupt.
    """
    run_dir = Path(run_dir)
    manager, step = _latest_step(run_dir)
    with manager:
        record = _read_record(manager, run_dir, step)
    record["checkpoint"] = str(run_dir / CHECKPOINTS / str(step) / "model" / MODEL_NPZ)
    return record


def latest_model(run_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, meta)`` of the latest finished epoch: ``{'params', 'batch_stats'}`` as numpy
    and the run's meta plus ``epoch`` (= ``read_run(run_dir)['epochs_done']``)."""
    run_dir = Path(run_dir)
    manager, step = _latest_step(run_dir)
    with manager:
        record = _read_record(manager, run_dir, step)
        try:
            with _quiet_absl():
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        except Exception as e:
            raise _corrupt(run_dir, step, e) from None
    variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
    return variables, {**record["meta"], "epoch": record["epochs_done"]}


# ----------------------------------------------------------------------------- the writer

def _saved_tree(state: Any) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


class RunWriter:
    """Saves every finished epoch of one training run into ``run_dir`` (see the module doc).

    ``RunWriter(run_dir, run_config, meta)`` for a new run (RunError when ``run_dir`` already
    holds one); ``.resume(template)`` continues the latest epoch. Use as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike, run_config: dict[str, Any], meta: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.meta = meta
        for key in ("model", "num_classes"):
            if key not in meta:
                raise RunError(f"a run directory needs meta['{key}'] (got keys {sorted(meta)}); "
                               "pass e.g. meta={'model': 'small_vgg', 'num_classes': 10}")
        self._manager: ocp.CheckpointManager | None = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = _manager(self.run_dir, read_only=False)
        return self._manager

    def check_new(self) -> None:
        """RunError when ``run_dir`` already holds a run (steps or exports)."""
        ckpt = self.run_dir / CHECKPOINTS
        if (self.run_dir / RUN_JSON).exists() or (ckpt.is_dir() and any(ckpt.iterdir())):
            raise RunError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose a new --out")

    def start(self) -> None:
        """Begin a new run: RunError when ``run_dir`` already holds one, else create ``checkpoints/``
        (so that a run interrupted before its first epoch can still be resumed)."""
        self.check_new()
        self._open()

    def resume(self, template: Any) -> tuple[Any, dict[str, Any] | None]:
        """The state and record of the latest finished epoch, restored into ``template``'s tree;
        ``(template, None)`` when the run was interrupted before finishing its first epoch.

        Refuses (RunError) other training data, another configuration or another model.
        Rewrites the exports when an interruption left them behind the step.
        """
        ckpt = self.run_dir / CHECKPOINTS
        if ckpt.is_dir() and not (self.run_dir / RUN_JSON).exists() and self._open().latest_step() is None:
            return template, None
        manager, step = _latest_step(self.run_dir)
        with manager:
            record = _read_record(manager, self.run_dir, step)
            saved = record["config"]
            if saved.get(DATA_KEY) != self.run_config.get(DATA_KEY):
                raise RunError(f"cannot resume {self.run_dir}: the training data differ from the run's "
                               f"({DATA_KEY} saved {str(saved.get(DATA_KEY))[:12]}... vs now "
                               f"{str(self.run_config.get(DATA_KEY))[:12]}...); pass the same data (dataset, "
                               "--train-limit, --poison-ratio, --seed) or choose a new --out")
            diff = [k for k in config_diff(saved, self.run_config) if k != DATA_KEY]
            if diff:
                detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {self.run_config.get(k)!r}" for k in diff)
                raise RunError(f"cannot resume {self.run_dir}: the configuration differs in {diff} ({detail}); "
                               "pass the original flags or a new --out")
            try:
                with _quiet_absl():
                    tree = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_saved_tree(template))))["state"]
            except Exception as e:
                raise RunError(f"{self.run_dir}: the saved training state (epoch {step}) does not fit this "
                               f"model/optimizer ({type(e).__name__}: {str(e)[:200]}); "
                               "pass the original --model or choose a new --out") from None
        state = template.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                                 opt_state=tree["opt_state"])
        if self._export_epoch() != step:
            self._export(state, record)
        return state, record

    def save_epoch(self, epoch: int, state: Any, history: list[dict[str, Any]]) -> None:
        """Commit finished epoch ``epoch`` (history: one record per epoch so far) as one orbax
        step, then write the exports."""
        record = json_ready({"config": self.run_config, "epochs_done": epoch, "history": history,
                             "meta": self.meta})
        variables = _host_variables(state)
        manager = self._open()
        manager.save(epoch, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_saved_tree(state)),
            run=ocp.args.JsonSave(record),
            model=ModelNpz(variables, {**self.meta, "epoch": epoch})))
        manager.wait_until_finished()
        on_write("commit")
        self._export(state, record, variables)

    def _export(self, state: Any, record: dict[str, Any], variables: PyTree | None = None) -> None:
        """``model.npz`` then ``run.json`` (each atomic) from one committed step; process 0 only."""
        if jax.process_index() != 0:
            return
        variables = _host_variables(state) if variables is None else variables
        epoch = record["epochs_done"]
        checkpoints.save_checkpoint(self.run_dir / MODEL_NPZ, variables, {**self.meta, "epoch": epoch})
        on_write("export model.npz")
        text = json.dumps({**record, "checkpoint": MODEL_NPZ}, indent=2) + "\n"
        checkpoints.atomic_write(self.run_dir / RUN_JSON, lambda f: f.write(text.encode()))
        on_write("export run.json")

    def _export_epoch(self) -> int | None:
        """The epoch the exported run.json describes (None when absent or unreadable)."""
        try:
            return json.loads((self.run_dir / RUN_JSON).read_text())["epochs_done"]
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _host_variables(state: Any) -> PyTree:
    return sharding.to_host({"params": state.params, "batch_stats": state.batch_stats})
