"""The config schema: choices are Enums checked at load, every key has help, variants state only their
differences over a ``base:``, and the renamed ``process.positions_per_step`` (old checkpoints migrate)."""

from __future__ import annotations

import io
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from glauber.commands.config_help import config_help
from glauber.config import ExperimentConfig, ImageExperimentConfig, Loss, load_config, with_defaults
from glauber.core.schedule import GlauberSchedule
from glauber.schema import Choice

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if not p.name.startswith("vq_"))


def leaves(obj: object, prefix: str = ""):
    """``(dotted key, dataclass field, default)`` of every leaf of a config root."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


CHOICE_KEYS = sorted({key for key, _, value in leaves(ImageExperimentConfig()) if isinstance(value, Choice)})


def flat(cfg) -> dict:
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return out


# -- choices ------------------------------------------------------------------------------------------------
def test_the_choice_fields_are_enums():
    assert set(CHOICE_KEYS) >= {
        "modality", "method", "process.noise", "process.loss", "process.step_weighting", "mdlm.sampler",
        "optim.lr_schedule", "image.infill_region", "image.fid_route", "schedule.alpha", "schedule.clock", "schedule.order",
    }  # fmt: skip


@pytest.mark.parametrize("key", [k for k in CHOICE_KEYS if k != "modality"])
def test_a_bad_choice_is_refused_at_load_naming_the_key_and_the_choices(key, tmp_path):
    cfg = load_config(ROOT / "experiments" / "emoji.yaml")
    allowed = [str(m) for m in type(OmegaConf.select(cfg, key))]
    section, _, name = key.rpartition(".")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {ROOT / 'experiments' / 'emoji.yaml'}\n" + (f"{section}:\n  {name}: nope\n" if section else f"{name}: nope\n")
    )
    for attempt in (lambda: load_config(bad), lambda: load_config(ROOT / "experiments" / "emoji.yaml", [f"{key}=nope"])):
        with pytest.raises(ValueError) as err:
            attempt()
        assert f"'{key}'" in str(err.value) and "nope" in str(err.value)
        assert all(a in str(err.value) for a in allowed), str(err.value)


def test_a_bad_list_choice_and_a_bad_modality_are_refused():
    with pytest.raises(ValueError, match=r"train.loggers.*csv, tensorboard, wandb"):
        load_config(ROOT / "experiments" / "tiny.yaml", ["train.loggers=[csv,mlflow]"])
    with pytest.raises(ValueError, match="modality must be one of text, image"):
        load_config(ROOT / "experiments" / "tiny.yaml", ["modality=audio"])


def test_choices_read_as_their_strings_and_round_trip_through_yaml_and_checkpoints():
    cfg = load_config(ROOT / "experiments" / "emoji.yaml", ["image.fid_route=clean-fid"])
    assert cfg.process.loss is Loss.weighted and cfg.process.loss == "weighted" and f"{cfg.process.loss}" == "weighted"
    assert {"weighted": 1}[cfg.process.loss] == 1 and cfg.image.fid_route == "clean-fid" and str(cfg.method) == "ggm"
    text = OmegaConf.to_yaml(cfg)
    assert "loss: weighted" in text and "fid_route: clean-fid" in text and "Loss" not in text
    assert flat(OmegaConf.merge(OmegaConf.structured(ImageExperimentConfig), OmegaConf.create(text))) == flat(cfg)
    # what a checkpoint stores is plain data: it loads with torch's weights-only loader (Lightning's resume)
    buf = io.BytesIO()
    torch.save({"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["config"]
    assert type(saved["process"]["loss"]) is str and type(saved["train"]["loggers"][0]) is str
    assert with_defaults(saved) == saved and type(with_defaults(saved)["image"]["fid_route"]) is str
    assert GlauberSchedule.from_config(cfg.schedule, cfg.data.seq_len).order == "random"


# -- help -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section", sorted({k.split(".")[0] for k, _, _ in leaves(ImageExperimentConfig())}))
def test_every_key_has_help(section):
    undocumented = [
        key
        for root in (ExperimentConfig(), ImageExperimentConfig())
        for key, f, _ in leaves(root)
        if key.split(".")[0] == section and not f.metadata.get("help")
    ]
    assert not undocumented, f"add field(..., metadata={{'help': ...}}) to {sorted(set(undocumented))}"


def test_config_help_lists_types_choices_and_defaults():
    text = config_help("image")
    assert "  process.loss: str = 'weighted'  (one of: analytic, single_sample, weighted, time_weighted," in text
    assert "  train.loggers: list[str] = ['csv', 'tensorboard']  (each one of: csv, tensorboard, wandb)" in text
    assert "  image.fid_route: str = 'auto'  (one of: auto, bundled, clean-fid)" in text
    assert "  process.positions_per_step: list[int] = []" in text and "base:" in text


# -- groups ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, base, differences",
    [
        ("owt_small", "owt", {"name": "owt-small", "model.size": "small", "train.run_dir": "runs/owt-small"}),
        (
            "ffhq",
            "celeba_hq",
            {
                "name": "ffhq",
                "data.source": "data/ffhq",
                "train.run_dir": "runs/ffhq",
                "image.fid_reference": "ffhq:256:trainval70k",
            },
        ),
    ],
)
def test_a_variant_is_its_base_but_for_its_differences(variant, base, differences):
    v, b = flat(load_config(ROOT / "experiments" / f"{variant}.yaml")), flat(load_config(ROOT / "experiments" / f"{base}.yaml"))
    assert {k: x for k, x in v.items() if b[k] != x} == differences
    assert "base" not in v and len(v) == len(b)


def test_the_owt_small_variant_loads_as_the_full_file_did():
    """The values experiments/owt_small.yaml spelled out before it became ``base: owt`` plus differences."""
    got = flat(load_config(ROOT / "experiments" / "owt_small.yaml"))
    spelled_out = {
        "name": "owt-small", "method": "ggm", "data.source": "Skylion007/openwebtext", "data.tokenizer": "gpt2",
        "data.seq_len": 1024, "data.wrap": "bos_eos", "data.val_documents": 100000, "data.num_proc": 16,
        "data.num_workers": 4, "model.size": "small", "model.dropout": 0.1, "model.condition_on_alpha": False,
        "schedule.alpha": "linear", "schedule.sweeps": 4, "schedule.positions_per_step": 1,
        "schedule.order": "round_robin", "process.loss": "weighted", "optim.lr": 3.0e-4, "optim.warmup_steps": 2500,
        "optim.lr_schedule": "constant", "optim.ema": 0.9999, "train.run_dir": "runs/owt-small",
        "train.global_batch_size": 512, "train.micro_batch_size": 32, "train.max_steps": 1000000,
        "train.accelerator": "gpu", "train.strategy": "ddp", "train.precision": "bf16-mixed", "train.compile": True,
        "train.val_batches": 50, "sample.num_samples": 4,
    }  # fmt: skip
    assert {k: got[k] for k in spelled_out} == spelled_out


def test_bases_merge_in_order_then_the_file_then_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ntrain:\n  max_steps: 7\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain:\n  seed: 2\n")
    (tmp_path / "c.yml").write_text("train:\n  log_every_steps: 3\n  seed: 3\n")
    (tmp_path / "v.yaml").write_text("base: [b, c.yml]\nname: v\n")
    cfg = load_config(tmp_path / "v.yaml", ["train.max_steps=9"])
    assert (cfg.name, cfg.train.max_steps, cfg.train.seed, cfg.train.log_every_steps) == ("v", 9, 3, 3)
    assert "base" not in OmegaConf.to_yaml(cfg)


def test_base_cycles_and_missing_bases_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere\nname: c\n")
    with pytest.raises(FileNotFoundError, match=r"c.yaml names base 'nowhere'.*nowhere.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: {x: 1}\nname: d\n")
    with pytest.raises(ValueError, match="base must be a file name or a list of them"):
        load_config(tmp_path / "d.yaml")


# -- one name for m -------------------------------------------------------------------------------------------
def test_the_old_key_is_refused_naming_the_new_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {ROOT / 'experiments' / 'tiny.yaml'}\nprocess:\n  train_positions_per_step: [2]\n")
    with pytest.raises(ValueError, match="'process.train_positions_per_step' is now 'process.positions_per_step'"):
        load_config(old)
    assert list(
        load_config(ROOT / "experiments" / "tiny.yaml", ["process.positions_per_step=[2,4]"]).process.positions_per_step
    ) == [2, 4]


def test_a_checkpoint_config_with_the_old_key_is_migrated():
    new = OmegaConf.to_container(load_config(ROOT / "experiments" / "tiny.yaml"), resolve=True, enum_to_str=True)
    old = {**new, "process": {k: v for k, v in new["process"].items() if k != "positions_per_step"}}
    old["process"]["train_positions_per_step"] = [1, 2, 4]
    del old["process"]["step_weighting"]  # and an option it predates gets today's default
    assert with_defaults(old) == new
    assert "train_positions_per_step" in old["process"]  # the caller's dict is left alone
