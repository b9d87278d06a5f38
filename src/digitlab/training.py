"""Training: one config dataclass, one loop, crash-safe checkpoints, exact resume.

Read `train_step` first: it is the tutorial's training step (forward, loss, zero_grad, backward, step).
Everything else in this file is what turns that step into a run you can trust: held-out validation,
checkpoints, interruption and resume, mixed precision, augmentation, several processes.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import calibration, checkpoint, data, distributed, extras, tracking
from .augment import augment_batch
from .devices import autocast, resolve_device, resolve_precision
from .errors import DigitlabError
from .evaluation import evaluate_tensors
from .figures import new_figure, save_png
from .fileio import atomic_write_bytes
from .models import MODELS, build_model, count_parameters
from .optim import OPTIMIZERS, SCHEDULES, Optimizer, make_optimizer, make_schedule


class ConfigError(DigitlabError, ValueError):
    """A training option with a bad value."""


class TrainingInterrupted(DigitlabError):
    """Ctrl-C or SIGTERM: the run saved `last` and can be resumed."""


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A named set of hyper-parameters for one model, chosen by measurement (docs/training.md). The defaults
    are what every recipe shares: AdamW with a OneCycle schedule and label smoothing 0.1."""

    model: str
    epochs: int
    lr: float
    batch_size: int = 256
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    weight_decay: float = 5e-4
    augment: bool = True
    label_smoothing: float = 0.1
    model_config: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # what it measured, for --list-recipes


RECIPES: dict[str, Recipe] = {
    # 2 epochs of OneCycle Adam reach ~98.2% test accuracy; label smoothing is worth ~0.3 points here.
    "mlp": Recipe(
        "mlp",
        epochs=2,
        lr=5e-3,
        weight_decay=0.0,
        augment=False,
        summary="the tutorial's network: 98.1%, 12 s on 2 fp32 CPU cores",
    ),
    # The default CNN, with the handwriting augmentation (augment.py): people's digits, not only MNIST's.
    "cnn": Recipe(
        "cnn",
        epochs=16,
        lr=4e-3,
        summary="99.47% on MNIST, 4.7 min on 2 fp32 cores; reads other people's handwriting best",
    ),
    # Chosen by mean validation accuracy over 3 seeds (benchmarks/recipe_sweep.py).
    "quick": Recipe(
        "cnn",
        epochs=2,
        lr=1.2e-2,
        batch_size=128,
        augment=False,
        summary="99.25%, 37 s on 2 fp32 cores (12 s with bf16); no augmentation",
    ),
    # The default CNN twice as deep (2 convs per resolution: 73k parameters, receptive field the whole digit),
    # trained 1.5x as long; ~2.7x the default's cost per epoch.
    "best": Recipe(
        "cnn",
        epochs=24,
        lr=4e-3,
        model_config={"channels": [16, 32, 64], "convs_per_stage": 2},
        summary="top accuracy: 99.69% (99.71% with --tta), 19 min on 2 fp32 cores; 73k parameters",
    ),
}
DEFAULT_RECIPES = {"mlp": "mlp", "cnn": "cnn"}  # the recipe a model trains with when none is named


def describe_recipes() -> list[str]:
    """One line per recipe: name, model, settings and what it measured."""
    return [
        f"{name:<6} --model {r.model}: {r.epochs} epochs, batch {r.batch_size}, {r.optimizer} lr {r.lr:g}, "
        f"{r.schedule}, {'augmented' if r.augment else 'no augmentation'}. {r.summary}"
        for name, r in RECIPES.items()
    ]


@dataclass
class TrainConfig:
    """Everything a run depends on. Fields left None take the recipe's value (see RECIPES): the named
    `recipe`, else the model's default one. `model` None means the recipe's model, else the tutorial's mlp."""

    model: str | None = None
    recipe: str | None = None
    epochs: int | None = None
    batch_size: int | None = None  # global: split across processes under torchrun
    lr: float | None = None
    optimizer: str | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    augment: bool | None = None
    label_smoothing: float | None = None
    val_size: int = 5000
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    data: str | None = None
    dataset: str = "mnist"
    out: str | None = None
    resume: str | None = None
    model_config: dict[str, Any] | None = None  # overrides of the model's config dataclass (from the recipe)
    overwrite: bool = False  # train into an --out dir that already holds a run, replacing it
    quiet: bool = False
    target_accuracy: float | None = None
    tensorboard: str | None = None  # also write each epoch's metrics as TensorBoard scalars into this dir

    def resolved(self) -> TrainConfig:
        """A copy with recipe defaults filled in and every value checked."""
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"--recipe {self.recipe!r}: expected one of {', '.join(RECIPES)}")
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r}: expected one of {', '.join(MODELS)}")
        name = self.recipe or DEFAULT_RECIPES.get(self.model or "mlp", self.model or "mlp")
        recipe = RECIPES[name]
        if self.model is not None and self.model != recipe.model:
            raise ConfigError(
                f"--recipe {name} trains a {recipe.model}, not a {self.model}: drop --model "
                f"or give --model {recipe.model}"
            )
        settings = {k: v for k, v in asdict(recipe).items() if k in {f.name for f in fields(self)}}
        filled = replace(self, **{k: v for k, v in settings.items() if getattr(self, k) is None})
        filled = replace(filled, recipe=name, model=recipe.model)
        filled.validate()
        return filled

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr {self.lr}: must be a positive number"),
            (self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"--schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing {self.label_smoothing}: must be in [0, 1)"),
            (self.val_size >= 0, f"--val-size {self.val_size}: must be >= 0"),
            (
                self.target_accuracy is None or 0 < self.target_accuracy <= 1,
                f"--target-accuracy {self.target_accuracy}: must be a fraction in (0, 1], e.g. 0.99",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class Run:
    """The outcome of `train`: where it wrote, what it measured."""

    dir: Path
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    best_epoch: int = 0
    test_accuracy: float | None = None
    test_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    temperature: float = 1.0  # fitted on the validation split; stored in the best checkpoint
    test_ece: float | None = None
    rank: int = 0  # this process's rank under torchrun; only rank 0 writes and reports

    @property
    def best(self) -> Path:
        return self.dir / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.dir / "last.safetensors"


# ----------------------------------------------------------------------------------------------------------
# The pieces of one training step
# ----------------------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: Optimizer | torch.optim.Optimizer,
    label_smoothing: float,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, update: the tutorial's step. Returns (loss, number correct) as tensors."""
    with autocast(x.device, amp_dtype):
        logits = model(x)  # (B, 10)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 needs loss scaling so small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


# ----------------------------------------------------------------------------------------------------------
# Interruption: finish the step, save, exit 130 (SIGINT) or 143 (SIGTERM)
# ----------------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by the first SIGINT/SIGTERM; the loop checks it after each step and then saves and stops.

    A second Ctrl-C stops at once by raising `abort()` (a one-line TrainingInterrupted), except while a
    checkpoint is being written (`protect()`): then it takes effect as soon as the checkpoint is complete.
    """

    def __init__(self, abort: Callable[[], BaseException] | None = None) -> None:
        self.signum: int | None = None
        self.abort = abort or KeyboardInterrupt
        self.saving = 0  # depth of protect()
        self.abort_pending = False  # a second Ctrl-C arrived during protect()

    def __bool__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def protect(self, then_abort: bool = True) -> Iterator[None]:
        """Defer a second Ctrl-C until the block (a checkpoint write) is done."""
        self.saving += 1
        try:
            yield
        finally:
            self.saving -= 1
        if self.abort_pending and not self.saving and then_abort:
            self.abort_pending = False
            raise self.abort()


@contextmanager
def stop_on_signals(flag: StopFlag | None = None) -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    flag = flag if flag is not None else StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            if flag.saving:
                flag.abort_pending = True  # ... once the checkpoint being written is complete
                return
            raise flag.abort()
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def default_out_dir(model: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{model}"


# The files a run writes into its dir (and `evaluate` beside its checkpoint): their presence marks a run dir,
# and --overwrite removes them.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "confusion.png",
    "mistakes.png",
    "best.safetensors",
    "best.json",
    "best.state.pt",
    "last.safetensors",
    "last.json",
    "last.state.pt",
)
# What --resume may change: where the run trains, where its data is, how loudly. (--epochs: see resume_conflicts.)
RESUME_MAY_CHANGE = ("resume", "device", "data", "quiet", "tensorboard")


def _as_option(name: str, value: Any) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def resume_conflicts(run_dir: Path, saved: TrainConfig, given: dict[str, Any]) -> list[str]:
    """The options in `given` (TrainConfig field -> value) that conflict with resuming the run saved as `saved`,
    spelled as on the command line. Values equal to the run's own are no conflict. `--epochs` may extend (or
    shorten) a run without a learning-rate schedule; a schedule is planned over the run's epochs, so it cannot
    change under one."""
    conflicts = []
    known = {f.name for f in fields(TrainConfig)}
    for name, value in given.items():
        if name in RESUME_MAY_CHANGE or name not in known:
            continue
        if name == "out":
            if Path(value).resolve() != run_dir.resolve():
                conflicts.append(f"--out {value}")
        elif name == "overwrite":
            if value:
                conflicts.append("--overwrite")
        elif name == "epochs":
            if value != saved.epochs and saved.schedule != "none":
                conflicts.append(
                    f"--epochs {value} (its {saved.schedule} schedule is planned over {saved.epochs} epochs)"
                )
        elif value != getattr(saved, name, None):
            conflicts.append(_as_option(name, value))
    return conflicts


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], TrainConfig]:
    """A run dir's config.json, raw and as a TrainConfig."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json (not a digitlab run dir)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume {run_dir}: unreadable config.json ({exc})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {run_dir}: config.json is not a JSON object")
    try:
        return saved, TrainConfig.from_json(saved)
    except TypeError as exc:
        raise ConfigError(f"--resume {run_dir}: unusable config.json ({exc})") from None


def check_resume_options(run_dir: str | Path, given: dict[str, Any]) -> None:
    """Raise ConfigError, naming them on one line, when options given with --resume conflict with the run."""
    run_dir = Path(run_dir)
    _, saved = read_run_config(run_dir)
    conflicts = resume_conflicts(run_dir, saved, given)
    if conflicts:
        raise ConfigError(
            f"--resume {run_dir}: {', '.join(conflicts)}: a resumed run keeps the settings in its config.json "
            f"(only --device, --data, --quiet, --tensorboard and, without a schedule, --epochs may be given)"
        )


@dataclass
class EpochTotals:
    """Running totals of the current epoch, summed over its steps so far."""

    loss_sum: float = 0.0  # sum of (mean loss of the batch * batch size)
    correct: float = 0.0  # images classified right
    seen: float = 0.0  # images trained on

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.correct, self.seen]


@dataclass
class TrainState:
    """The loop's resumable state: where the run is and what it has measured so far.

    `save_last` writes it, with the optimizer, scheduler, loss-scaler and augmentation-RNG states, into
    last.state.pt; `--resume` reads it back (`from_saved`).
    """

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the current epoch
    totals: EpochTotals = field(default_factory=EpochTotals)
    epoch_seconds: float = 0.0  # training time of the current epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    best_val_accuracy: float = -1.0
    best_epoch: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_saved(cls, raw: dict[str, Any]) -> TrainState:
        totals = raw.get("totals")
        if isinstance(totals, dict):
            totals = EpochTotals(*(float(totals[k]) for k in ("loss_sum", "correct", "seen")))
        else:  # written before the totals had names: [loss * n, correct, n]
            totals = EpochTotals(*(float(v) for v in raw["epoch_sums"]))
        return cls(
            epoch=int(raw["epoch"]),
            step_in_epoch=int(raw["step_in_epoch"]),
            totals=totals,
            epoch_seconds=float(raw.get("epoch_seconds", 0.0)),
            history=list(raw["history"]),
            best_val_accuracy=float(raw["best_val_accuracy"]),
            best_epoch=int(raw["best_epoch"]),
        )


def _state_attribute(name: str) -> property:
    """Trainer.<name> reads and writes Trainer.state.<name>."""
    return property(
        lambda self: getattr(self.state, name),
        lambda self, value: setattr(self.state, name, value),
        doc=f"Trainer.state.{name}",
    )


class Trainer:
    """Holds the state of one run; `fit` is the epoch loop."""

    epoch = _state_attribute("epoch")
    step_in_epoch = _state_attribute("step_in_epoch")
    epoch_seconds = _state_attribute("epoch_seconds")
    history = _state_attribute("history")
    best_val_accuracy = _state_attribute("best_val_accuracy")
    best_epoch = _state_attribute("best_epoch")

    def __init__(self, cfg: TrainConfig):
        self.ctx = distributed.context_from_env()
        self.resume_dir = Path(cfg.resume) if cfg.resume else None
        if self.resume_dir is not None:
            cfg = self._config_for_resume(cfg, self.resume_dir)
        self.cfg = cfg.resolved()
        self.device = resolve_device(self.cfg.device)
        if self.ctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.ctx.local_rank)
        self.amp_dtype = resolve_precision(self.cfg.precision, self.device)
        self.out = Path(self.cfg.out) if self.cfg.out else default_out_dir(self.cfg.model)
        if self.resume_dir is None:
            self._check_out_dir()  # before any slow work
        self.console = None if (self.cfg.quiet or not self.ctx.is_main) else _console()
        self.tracker = tracking.Tracker(self.cfg.tensorboard if self.ctx.is_main else None)  # before slow work
        self.state = TrainState()  # what save_last writes and --resume restores
        self.stop_flag = StopFlag(abort=self._aborted)
        self.aug_generator = torch.Generator().manual_seed(self.cfg.seed + 1 + self.ctx.rank)
        # Built by setup():
        self.dataset: data.MnistData | None = None
        self.loader: data.BatchLoader | None = None
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None  # held-out images and labels
        self.model: nn.Module | None = None
        self.net: nn.Module | None = None  # the model, wrapped in DistributedDataParallel under torchrun
        self.optimizer: Optimizer | None = None
        self.scheduler = None
        self.scaler: torch.amp.GradScaler | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights, in memory

    @staticmethod
    def _config_for_resume(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
        raw, saved = read_run_config(run_dir)
        defaults = TrainConfig()
        given = {
            f.name: getattr(cfg, f.name)
            for f in fields(TrainConfig)
            if getattr(cfg, f.name) != getattr(defaults, f.name)
        }
        check_resume_options(run_dir, given)
        # The run continues with its own settings; only where it runs and how loudly may change (and --epochs
        # of a run without a schedule).
        return replace(
            saved,
            out=str(run_dir),
            resume=str(run_dir),
            device=cfg.device,
            quiet=cfg.quiet,
            data=cfg.data or raw.get("data"),
            epochs=cfg.epochs or saved.epochs,
            tensorboard=cfg.tensorboard or saved.tensorboard,
        )

    def _check_out_dir(self) -> None:
        """A new run must not land on an existing one unless --overwrite says so."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not self.cfg.overwrite:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise ConfigError(
                f"--out {out}: already holds a training run ({shown}); pass --overwrite to replace "
                f"it, or --resume {out} to continue it"
            )

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False)

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        distributed.init(self.ctx, self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.dataset = data.load(cfg.data, cfg.dataset)
        spec = self.dataset.spec
        (train_x, train_y), (val_x, val_y) = data.split_train_val(
            self.dataset.train_images, self.dataset.train_labels, cfg.val_size, cfg.seed
        )
        self.loader = data.BatchLoader(
            train_x,
            train_y,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            mean=spec.mean,
            std=spec.std,
            device=self.device,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.val = (val_x, val_y)
        model = build_model(cfg.model, {**(cfg.model_config or {}), "num_classes": len(spec.class_names)})
        model = model.to(self.device)
        if cfg.model == "cnn":
            model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
        self.model = model
        self.net = model
        if self.ctx.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
        self.scheduler = make_schedule(cfg.schedule, self.optimizer, cfg.lr, cfg.epochs * len(self.loader))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if self.resume_dir is not None:
            self._restore()
        elif self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:  # checked in __init__: the dir holds a run and --overwrite was given
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
                checkpoint.remove_stale_temp_files(*(self.out / name for name in RUN_FILES))
            self._write_config()
            (self.out / "metrics.jsonl").unlink(missing_ok=True)

    def _write_config(self) -> None:
        atomic_write_bytes(self.out / "config.json", (json.dumps(self.cfg.to_json(), indent=2) + "\n").encode())

    def _restore(self) -> None:
        last = self.out / "last"
        # Both are checked against the SHA-256s in last.json: a checkpoint torn by a kill is refused here.
        state = checkpoint.load_state(last)
        model, info = checkpoint.load(last, expect_model=self.cfg.model)
        self.model.load_state_dict(model.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(
                f"{self.out / 'last.state.pt'}: optimizer state does not fit this run "
                f"({exc.__class__.__name__}: {exc}); it was written by another digitlab version"
            ) from None
        try:
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            generators = state["aug_generator"]
            self.aug_generator.set_state(generators[self.ctx.rank % len(generators)])
            self.state = TrainState.from_saved(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(
                f"{self.out / 'last.state.pt'}: incomplete resume state ({exc.__class__.__name__}: {exc})"
            ) from None
        s = self.state
        if info.epoch != len(s.history):  # for checkpoints written before sidecars recorded SHA-256s
            raise checkpoint.CheckpointError(
                f"{self.out / 'last.json'}: epoch {info.epoch} does not match its resume state "
                f"({len(s.history)} epochs): the checkpoint is inconsistent"
            )
        if s.epoch > self.cfg.epochs:
            raise ConfigError(f"--epochs {self.cfg.epochs}: the run in {self.out} has already done {s.epoch} epochs")
        self._restore_best()
        if self.ctx.is_main:
            checkpoint.remove_stale_temp_files(*(self.out / name for name in RUN_FILES))
            # Roll metrics.jsonl back to the checkpoint: lines of epochs after it (written before a kill) go.
            atomic_write_bytes(
                self.out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in s.history).encode()
            )
            if read_run_config(self.out)[1].epochs != self.cfg.epochs:
                self._write_config()  # --epochs extended (or shortened) the run
        self.log(f"resuming {self.out} at epoch {s.epoch + 1}, step {s.step_in_epoch}")

    def _restore_best(self) -> None:
        """The best epoch's weights, for `finish`: from best.*, or from last.* when a kill came between the two
        saves at the end of the best epoch (last is saved first)."""
        s = self.state
        if s.best_epoch <= 0:
            return
        best = self.out / "best"
        best_epoch_on_disk = checkpoint.read_info(best).epoch if (self.out / "best.json").exists() else None
        if best_epoch_on_disk != s.best_epoch and s.best_epoch == s.epoch and s.step_in_epoch == 0:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.ctx.is_main:
                record = next(r for r in s.history if r["epoch"] == s.best_epoch)
                with self.stop_flag.protect():
                    checkpoint.save(best, self.model, self._info(record["epoch"], record))
        elif best_epoch_on_disk is not None:
            self.best_state = checkpoint.load(best, expect_model=self.cfg.model)[0].state_dict()

    # -- checkpoints ------------------------------------------------------------------------------------

    def _info(self, epoch: int, metrics: dict[str, Any]) -> checkpoint.CheckpointInfo:
        spec = self.dataset.spec
        return checkpoint.CheckpointInfo(
            model=self.cfg.model,
            model_config={},
            mean=spec.mean,
            std=spec.std,
            class_names=list(spec.class_names),
            dataset=spec.name,
            dataset_md5=dict(self.dataset.md5),
            epoch=epoch,
            metrics=metrics,
            train_config=self.cfg.to_json(),
        )

    def _gather_generator_states(self) -> list[torch.Tensor]:
        state = self.aug_generator.get_state()
        if not self.ctx.enabled:
            return [state]
        gathered = [torch.empty_like(state) for _ in range(self.ctx.world_size)]
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def save_last(self) -> None:
        generators = self._gather_generator_states()  # every rank takes part in the collective
        if not self.ctx.is_main:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "aug_generator": generators,
            **self.state.to_json(),
        }
        metrics = self.state.history[-1] if self.state.history else {}
        with self.stop_flag.protect():
            checkpoint.save(self.out / "last", self.model, self._info(len(self.state.history), metrics), state)

    def save_best(self, record: dict[str, Any]) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ctx.is_main:
            with self.stop_flag.protect():
                checkpoint.save(self.out / "best", self.model, self._info(record["epoch"], record))

    # -- the loop ---------------------------------------------------------------------------------------

    def train_epoch(self, stop: StopFlag) -> bool:
        """Train the rest of the current epoch; False when a signal stopped it mid-way."""
        cfg = self.cfg
        self.net.train()
        self.loader.set_epoch(self.epoch)
        steps = len(self.loader)
        progress = _progress(self.console, f"epoch {self.epoch + 1}/{cfg.epochs}", steps, self.step_in_epoch)
        start = time.perf_counter() - self.epoch_seconds
        # Running totals stay on the device: reading them back every step would stall a GPU.
        acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        sums = torch.tensor(self.state.totals.as_list(), dtype=acc_dtype, device=self.device)
        first = self.step_in_epoch  # > 0 when resuming mid-epoch: the loader starts after the batches done
        for i, (x, y) in enumerate(self.loader.iter_from(first), start=first):
            if cfg.augment:
                spec = self.dataset.spec
                x = augment_batch(x, y, self.aug_generator, spec.mean, spec.std)
            if cfg.model == "cnn":
                x = x.contiguous(memory_format=torch.channels_last)
            loss, correct = train_step(self.net, x, y, self.optimizer, cfg.label_smoothing, self.amp_dtype, self.scaler)
            if self.scheduler is not None:
                self.scheduler.step()
            sums[0] += loss.to(acc_dtype) * len(y)
            sums[1] += correct
            sums[2] += len(y)
            self.step_in_epoch = i + 1
            if progress is not None and (self.step_in_epoch % 20 == 0 or self.step_in_epoch == steps):
                progress.update(self.step_in_epoch, sums.tolist(), time.perf_counter() - start)
            if distributed.any_flag(bool(stop), self.ctx, self.device):
                break
        if progress is not None:
            progress.close()
        self.state.totals, self.epoch_seconds = EpochTotals(*sums.tolist()), time.perf_counter() - start
        return self.step_in_epoch == steps

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log, checkpoint; returns the epoch's record."""
        s = self.state
        loss_sum, correct, seen = distributed.all_reduce_sum(s.totals.as_list(), self.ctx, self.device)
        val = (
            evaluate_tensors(
                self.model, *self.val, self.dataset.spec.mean, self.dataset.spec.std, self.device, self.amp_dtype
            )
            if len(self.val[1])
            else None
        )
        record = {
            "epoch": s.epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val.loss if val else None,
            "val_accuracy": val.accuracy if val else None,
            "epoch_seconds": round(s.epoch_seconds, 3),
            "images_per_second": round(seen / max(s.epoch_seconds, 1e-9), 1),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        s.history.append(record)
        s.epoch, s.step_in_epoch, s.totals, s.epoch_seconds = s.epoch + 1, 0, EpochTotals(), 0.0
        val_text = f"val loss {val.loss:.4f}  val acc {val.accuracy:.2%}" if val else "no validation set"
        self.log(
            f"epoch {record['epoch']:>2}/{self.cfg.epochs}  train loss {record['train_loss']:.4f}  "
            f"{val_text}  {record['epoch_seconds']:.1f}s  {record['images_per_second']:,.0f} img/s"
        )
        score = record["val_accuracy"] if val else record["train_accuracy"]
        improved = score > s.best_val_accuracy
        if improved:
            s.best_val_accuracy, s.best_epoch = score, record["epoch"]
        with self.stop_flag.protect():  # a second Ctrl-C waits for these writes
            if self.ctx.is_main:
                with open(self.out / "metrics.jsonl", "a") as fh:  # rolled back to `last` on resume
                    fh.write(json.dumps(record) + "\n")
                self.tracker.log(record)
            # last before best: a kill between the two leaves a `last` that says which epoch is best, and
            # `_restore_best` then takes the best weights from it.
            self.save_last()
            if improved:
                self.save_best(record)
        return record

    def interrupted(self, signum: int) -> TrainingInterrupted:
        with self.stop_flag.protect(then_abort=False):
            self.save_last()
        self.stop_flag.abort_pending = False  # a second Ctrl-C during the save: the save completed, stop as asked
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        exc = TrainingInterrupted(
            f"interrupted ({name}) at epoch {self.epoch + 1}, step {self.step_in_epoch}; saved {self.out / 'last'}; "
            f"resume with: digitlab train --resume {self.out}"
        )
        exc.exit_code = 128 + int(signum)
        return exc

    def _aborted(self) -> TrainingInterrupted:
        """What a second Ctrl-C raises: stop at once, without saving the current position."""
        if (self.out / "last.json").exists():
            where = f"resume from the last checkpoint with: digitlab train --resume {self.out}"
        else:
            where = "nothing was saved yet (the first checkpoint is written at the end of epoch 1)"
        exc = TrainingInterrupted(f"interrupted again (second Ctrl-C): stopped at once, without saving; {where}")
        exc.exit_code = 128 + int(signal.SIGINT)
        return exc

    def fit(self) -> Run:
        start = time.perf_counter()
        self.setup()
        cfg = self.cfg
        self.log(
            f"training {cfg.model} ({count_parameters(self.model):,} parameters) on "
            f"{self.dataset.spec.title}: {len(self.loader.y):,} train / {len(self.val[1]):,} val images, "
            f"device {self.device}{', ' + str(self.amp_dtype).replace('torch.', '') if self.amp_dtype else ''}"
            f"{f', {self.ctx.world_size} processes' if self.ctx.enabled else ''} -> {self.out}"
        )
        stopped_early = False
        with stop_on_signals(self.stop_flag) as stop:
            while self.epoch < cfg.epochs:
                if not self.train_epoch(stop):
                    raise self.interrupted(stop.signum or signal.SIGINT)
                record = self.end_epoch()
                if stop:
                    raise self.interrupted(stop.signum)
                if cfg.target_accuracy is not None and (record["val_accuracy"] or 0) >= cfg.target_accuracy:
                    stopped_early = record["epoch"] < cfg.epochs
                    self.log(f"validation accuracy reached the target {cfg.target_accuracy:.2%}: stopping")
                    break
        return self.finish(start, stopped_early)

    def fit_temperature(self) -> float:
        """The softmax temperature that calibrates the best model, fitted on the validation split (1.0
        without one: the test set never chooses anything)."""
        if len(self.val[1]) == 0:
            return 1.0
        spec = self.dataset.spec
        val = evaluate_tensors(self.model, *self.val, spec.mean, spec.std, self.device, None)
        return calibration.fit_temperature(val.logits.numpy(), self.val[1].numpy())

    def finish(self, start: float, stopped_early: bool) -> Run:
        """Test the best model once, record it, draw the curves."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        spec = self.dataset.spec
        temperature = self.fit_temperature()
        test = evaluate_tensors(
            self.model, self.dataset.test_images, self.dataset.test_labels, spec.mean, spec.std, self.device, None
        )
        test_ece = calibration.expected_calibration_error(
            calibration.softmax(test.logits.numpy(), temperature), self.dataset.test_labels.numpy()
        )
        spread = distributed.weight_spread(self.model, self.ctx, self.device)
        run = Run(
            dir=self.out,
            config=self.cfg,
            history=self.history,
            best_val_accuracy=self.best_val_accuracy,
            best_epoch=self.best_epoch,
            test_accuracy=test.accuracy,
            test_loss=test.loss,
            stopped_early=stopped_early,
            seconds=time.perf_counter() - start,
            rank=self.ctx.rank,
            temperature=temperature,
            test_ece=test_ece,
        )
        self.log(
            f"test accuracy {test.accuracy:.2%}  test loss {test.loss:.4f}  ece {test_ece:.4f}  "
            f"(best epoch {self.best_epoch}, temperature {temperature:.3f}, {run.seconds:.1f}s)  "
            f"checkpoint {self.out / 'best.safetensors'}"
        )
        # The result is out: draw curves.png (1 s on a 2-core CPU, most of it importing matplotlib) in a thread
        # while the checkpoint and summary are written. Started earlier, beside the test pass, it delayed the
        # MLP's result by more than it saved (measured: docs/benchmarks.md).
        curves = self._draw_curves_in_background()
        if self.ctx.is_main:
            best_record = next((r for r in self.history if r["epoch"] == self.best_epoch), {})
            metrics = {**best_record, "test_accuracy": test.accuracy, "test_loss": test.loss, "test_ece": test_ece}
            info = self._info(self.best_epoch, metrics)
            info.temperature = temperature
            checkpoint.save(self.out / "best", self.model, info)
            summary = {
                "test_accuracy": test.accuracy,
                "test_loss": test.loss,
                "test_ece": test_ece,
                "temperature": temperature,
                "best_epoch": self.best_epoch,
                "best_val_accuracy": self.best_val_accuracy,
                "seconds": round(run.seconds, 3),
                "stopped_early": stopped_early,
                "processes": self.ctx.world_size,
                "max_weight_difference_between_processes": spread,
            }
            atomic_write_bytes(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        if curves is not None:
            curves.result()  # waits for the drawing; re-raises what went wrong in the thread
        return run

    def _draw_curves_in_background(self) -> Future | None:
        """Start drawing curves.png (rank 0 only); None where nothing is drawn."""
        if not self.ctx.is_main:
            return None
        if not extras.plots_available():
            extras.plots_skipped(["curves.png"])
            return None
        executor = ThreadPoolExecutor(1, thread_name_prefix="digitlab-curves")
        future = executor.submit(plot_curves, list(self.history), self.out / "curves.png")
        executor.shutdown(wait=False)  # the submitted drawing still runs; the worker thread ends after it
        return future


def train(config: TrainConfig | None = None, **overrides: Any) -> Run:
    """Train a model; `train(model="cnn")` is short for `train(TrainConfig(model="cnn"))`."""
    config = replace(config or TrainConfig(), **overrides)
    trainer = Trainer(config)
    try:
        return trainer.fit()
    except (RuntimeError, ConnectionError) as exc:
        if trainer.ctx.enabled:
            raise distributed.lost_peer(trainer.ctx, exc) from None
        raise
    finally:
        trainer.tracker.close()
        distributed.shutdown()


# ----------------------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------------------


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val, as a PNG (written atomically)."""
    epochs = [r["epoch"] for r in history]
    fig = new_figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    # The train loss is measured against the label-smoothed targets, so it sits above the val loss.
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (smoothed targets)")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    if history and history[0]["val_loss"] is not None:
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
        ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="val")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def _console():
    from rich.console import Console

    return Console(stderr=False)


class _EpochProgress:
    """A rich progress bar showing loss, running accuracy and images/s."""

    def __init__(self, console, title: str, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(title, total=total, completed=done, stats="")
        self.progress.start()

    def update(self, done: int, sums: list[float], elapsed: float) -> None:
        loss_sum, correct, seen = sums
        rate = seen / max(elapsed, 1e-9)
        stats = f"loss {loss_sum / max(seen, 1):.4f}  acc {correct / max(seen, 1):.2%}  {rate:,.0f} img/s"
        self.progress.update(self.task, completed=done, stats=stats)

    def close(self) -> None:
        self.progress.stop()


def _progress(console, title: str, total: int, done: int) -> _EpochProgress | None:
    if console is None or not sys.stdout.isatty():
        return None
    return _EpochProgress(console, title, total, done)
