"""User mistakes at the command line (issue #12): each gives one ``glauber COMMAND: error: ...`` line naming
the option, key or file and the fix, and exit status 2: never a traceback, never a silent wrong run.
The faults are listed in docs/RELIABILITY.md ("Faults tested")."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from corpus import corpus_overrides

import glauber.commands.sample
from glauber import files
from glauber.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"  # L = 32
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def train_tiny(tmp: Path, method: str) -> Path:
    run = tmp / method
    args = [*corpus_overrides(tmp, CORPUS), f"method={method}", f"train.run_dir={run}", "train.max_steps=1"]
    assert main(["train", str(TINY), *args, "train.val_every_steps=1000"]) == 0
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One-step GGM and AR checkpoints of experiments/tiny.yaml."""
    tmp = tmp_path_factory.mktemp("cli_faults")
    return {"ggm": train_tiny(tmp, "ggm"), "ar": train_tiny(tmp, "ar")}


def refused(argv: list[str], capsys) -> str:
    """Run ``glauber argv``; it must exit 2 with an error message and no traceback. Returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err, err
    return err


# -- 1. counts and draw options that would do nothing or crash late ----------------------------------------
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--positions-per-step", "0", "argument --positions-per-step: must be an integer >= 1 (got 0)"),
        ("--m", "2", "argument --m: was renamed: use --positions-per-step"),
        ("--num", "0", "argument --num: must be an integer >= 1 (got 0)"),
        ("--batch-size", "0", "argument --batch-size: must be an integer >= 1 (got 0)"),
        ("--temperature", "0", "argument --temperature: must be a finite number > 0 (got 0)"),
        ("--top-p", "0", "argument --top-p: must be a number in (0, 1]"),
        ("--top-p", "1.5", "argument --top-p: must be a number in (0, 1]"),
    ],
)
def test_sample_refuses_counts_below_one_and_bad_draw_options(tmp_path, capsys, option, value, message):
    out = tmp_path / "s.txt"
    err = refused(["sample", str(tmp_path / "x.ckpt"), option, value, "--out", str(out)], capsys)
    assert message in err and not out.exists()


def test_eval_ppl_refuses_counts_below_one(tmp_path, capsys):
    err = refused(["eval-ppl", str(tmp_path / "x.ckpt"), "--num-samples", "0"], capsys)
    assert "argument --num-samples: must be an integer >= 1 (got 0)" in err


def test_sample_refuses_m_not_dividing_the_length(trained, tmp_path, capsys):
    out = tmp_path / "s.txt"
    err = refused(["sample", str(trained["ggm"]), "--positions-per-step", "3", "--out", str(out), "--device", "cpu"], capsys)
    assert "--positions-per-step 3 does not divide the checkpoint's sequence length L=32" in err and "[1, 2, 4, 8, 16, 32]" in err
    assert not out.exists()


# -- 2. AR cannot infill a suffix ----------------------------------------------------------------------------
def test_ar_checkpoint_refuses_suffix_and_says_what_to_use(trained, tmp_path, capsys):
    out = tmp_path / "s.txt"
    argv = ["sample", str(trained["ar"]), "--prefix", "Line", "--suffix", "dog.", "--out", str(out), "--device", "cpu"]
    err = refused(argv, capsys)
    assert "--suffix" in err and "autoregressive" in err and "GGM or MDLM checkpoint" in err and not out.exists()
    # a prefix alone is what AR can do
    assert main(["sample", str(trained["ar"]), "--prefix", "Line", "--num", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_text().split("\n", 1)[1].startswith("Line")


# -- 3. YAML syntax errors -------------------------------------------------------------------------------------
def test_yaml_syntax_error_names_file_line_and_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  size: tiny\ntrain:\n  loggers: [csv\n  max_steps: 3\n")
    err = refused(["train", str(bad)], capsys)
    assert f"config file {bad}, line " in err and "YAML syntax error" in err
    assert len(err.strip().splitlines()) == 1, err


# -- 4. damaged or foreign checkpoints -------------------------------------------------------------------------
def damaged(kind: str, good: Path, tmp: Path) -> Path:
    path = tmp / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "foreign dict":
        torch.save({"a": 1}, path)
    elif kind == "foreign list":
        torch.save([1, 2, 3], path)
    elif kind == "folder":
        path.mkdir()
    return path


KINDS = ["empty", "truncated", "garbage", "text", "foreign dict", "foreign list", "folder"]


@pytest.mark.parametrize("command", ["sample", "eval-ppl", "eval-fid"])
def test_damaged_or_foreign_checkpoint_is_refused_naming_the_file(trained, tmp_path, capsys, command):
    for kind in KINDS:
        path = damaged(kind, trained["ggm"], tmp_path)
        argv = {
            "sample": ["sample", str(path), "--device", "cpu"],
            "eval-ppl": ["eval-ppl", str(path), "--judge", f"ckpt:{trained['ar']}", "--device", "cpu"],
            "eval-fid": ["eval-fid", "--checkpoint", str(path), "--device", "cpu"],
        }[command]
        err = refused(argv, capsys)
        assert f"checkpoint {path}" in err or f"{path} is not a glauber checkpoint" in err, (kind, err)
        assert len(err.strip().splitlines()) == 1, (kind, err)


# -- 5. eval-fid on a folder without images -----------------------------------------------------------------------
def test_eval_fid_refuses_a_folder_without_images(tmp_path, capsys):
    empty, texts, images = tmp_path / "empty", tmp_path / "texts", tmp_path / "images"
    empty.mkdir()
    texts.mkdir()
    (texts / "notes.txt").write_text("no images here")
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(b"")  # only the names are looked at before FID starts
    err = refused(["eval-fid", "--generated", str(empty), "--reference", str(images), "--device", "cpu"], capsys)
    assert f"--generated {empty}: the folder is empty" in err
    err = refused(["eval-fid", "--generated", str(images), "--reference", str(texts), "--device", "cpu"], capsys)
    assert f"--reference {texts}: the folder holds no image files" in err
    err = refused(["eval-fid", "--make-stats", str(empty), "--out", str(tmp_path / "s.npz")], capsys)
    assert f"--make-stats {empty}: the folder is empty" in err


# -- 6. outputs that would fail only after minutes of work ---------------------------------------------------------
@pytest.mark.parametrize("where", ["file in the way", "folder", "proc"])
def test_unwritable_out_fails_before_loading_the_model(trained, tmp_path, capsys, where, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = {"file in the way": blocker / "s.txt", "folder": tmp_path, "proc": Path("/proc/glauber-test/s.txt")}[where]
    loaded = []
    import glauber.commands.eval_ppl
    import glauber.eval.inference

    real = glauber.eval.inference.load_checkpoint
    for module in (glauber.commands.sample, glauber.commands.eval_ppl):
        monkeypatch.setattr(module, "load_checkpoint", lambda *a, **k: loaded.append(a) or real(*a, **k))
    for argv in (
        ["sample", str(trained["ggm"]), "--out", str(out), "--device", "cpu"],
        ["eval-ppl", str(trained["ggm"]), "--judge", "no/such/judge", "--out", str(out), "--device", "cpu"],
    ):
        err = refused(argv, capsys)
        assert f"--out {out}" in err, err
    assert not loaded and blocker.read_text() == "a file"


def test_train_run_dir_blocked_by_a_file_is_refused_at_start(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    run = blocker / "x"
    err = refused(["train", str(TINY), *corpus_overrides(tmp_path, CORPUS), f"train.run_dir={run}"], capsys)
    assert f"train.run_dir={run}: {blocker} is a file, not a folder" in err
    assert not (tmp_path / "cache").exists()  # refused before the data was touched


# -- 7. other user mistakes exit 2 with one line; bugs keep their traceback ---------------------------------------
@pytest.mark.parametrize(
    "error, shown",
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.txt"), "No such file or directory: /data/x.txt"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/y"), "Permission denied: /data/y"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (ValueError("bad value for --thing"), "bad value for --thing"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, error, shown):
    def fail(args):
        raise error

    monkeypatch.setattr(glauber.commands.sample, "run", fail)
    assert main(["sample", "x.ckpt"]) == 2
    assert capsys.readouterr().err == f"glauber sample: error: {shown}\n"
    monkeypatch.setenv("GLAUBER_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["sample", "x.ckpt"])
    monkeypatch.delenv("GLAUBER_DEBUG")

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(glauber.commands.sample, "run", bug)
    with pytest.raises(KeyError):
        main(["sample", "x.ckpt"])


def test_argparse_mistakes_return_2_instead_of_raising(capsys):
    assert main(["sample"]) == 2
    assert "the following arguments are required: checkpoint" in capsys.readouterr().err
    assert main(["sample", "--help"]) == 0


def test_output_checks_leave_no_probe_files(tmp_path):
    files.check_output_file(tmp_path / "new" / "s.txt")
    files.check_output_dir(tmp_path / "run", "train.run_dir")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "run"]
    shutil.rmtree(tmp_path / "new")


# -- 8. train.devices that Lightning would reject with a traceback ---------------------------------------------------
@pytest.mark.parametrize(
    "value, shown",
    [
        ("abc", "train.devices must be auto, -1 (all), a count >= 1"),
        ("-2", "train.devices must be auto, -1 (all), a count >= 1"),
        ("[abc]", "train.devices: a list of device ids must hold integers >= 0"),
        ("-1", "train.devices=-1 names GPU ids (or all GPUs), but training runs on the CPU"),
        ("[0]", "train.devices=[0] names GPU ids (or all GPUs), but training runs on the CPU"),
    ],
)
def test_nonsense_train_devices_is_refused_naming_the_key(tmp_path, capsys, value, shown):
    run = tmp_path / "run"
    argv = ["train", str(TINY), *corpus_overrides(tmp_path, CORPUS), f"train.run_dir={run}", "train.accelerator=cpu"]
    err = refused([*argv, f"train.devices={value}"], capsys)
    assert shown in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()  # refused at validation, before the data was touched


# -- 9. a judge whose character vocabulary cannot encode the samples ---------------------------------------------------
def test_a_char_judge_missing_characters_of_the_samples_is_refused_before_sampling(trained, tmp_path, capsys, monkeypatch):
    import glauber.commands.eval_ppl
    from glauber.eval.judges import load_judge

    run = tmp_path / "judge"
    narrow = [f"data.source={tmp_path / 'narrow.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    (tmp_path / "narrow.txt").write_text("the lazy dog.\n" * 300)  # no digits, no 'L', 'q', 'x', ':' ...
    assert main(["train", str(TINY), *narrow, "method=ar", f"train.run_dir={run}", "train.max_steps=1"]) == 0
    judge_ckpt = run / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    sampled = []
    monkeypatch.setattr(glauber.commands.eval_ppl, "generate", lambda *a, **k: sampled.append(a))
    err = refused(["eval-ppl", str(trained["ggm"]), "--judge", f"ckpt:{judge_ckpt}", "--device", "cpu"], capsys)
    assert f"judge ckpt:{judge_ckpt} cannot score the samples of {trained['ggm']}" in err, err
    assert "lacks '0', '1', '2'" in err and "':', 'L', 'b'" in err and "more. Use a judge" in err and "gpt2-large" in err
    assert len(err.strip().splitlines()) == 1 and not sampled  # refused before any sampling
    # texts given directly (compare, the training callback) are refused at encoding, naming the characters
    judge = load_judge(f"ckpt:{judge_ckpt}", "cpu")
    with pytest.raises(ValueError, match=r"cannot score these texts: its \d+-character vocabulary lacks 'L', 'x'"):
        judge.encode(["the lazy dog.", "Lax"])
    assert judge.encode(["the lazy dog."])[0].shape == (1, 13)
