"""Faults and bad input in the data layer (issue #12): caches that notice an edited corpus, resumes refused
on data whose ids mean other tokens, .txt corpora tokenised in bounded memory, one clear message per bad
file, and one valid image token cache when two processes build it at once."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import bare_trainer

from data_modules.corpus import TextFiles
from data_modules.text import TextDataConfig, TextDataModule
from data_modules.tokenizers import CharTokenizer, GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def make_dm(tmp_path: Path, source: Path, **cfg) -> TextDataModule:
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    cfg.setdefault("tokenizer", "char")
    cfg.setdefault("wrap", "none")
    cfg.setdefault("seq_len", 4)
    return TextDataModule(TextDataConfig(source=str(source), **cfg), batch_size=2)


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stream(dm: TextDataModule) -> np.ndarray:
    """The whole token stream of a built cache (train then val)."""
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    return np.concatenate([np.fromfile(dm.cache_path / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")])


def one_line_error(excinfo) -> str:
    """The message of a refusal: a single line, with no chained traceback behind it."""
    e = excinfo.value
    assert len(str(e).splitlines()) == 1, str(e)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), repr(e.__context__)
    return str(e)


# -- 1. caches and checkpoints notice what changed -----------------------------------------------------
def test_an_edited_corpus_of_the_same_size_rebuilds_into_a_new_cache(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcd" * 30)
    old = ready(make_dm(tmp_path, src))
    old_bytes = (old.cache_path / "train.bin").read_bytes()
    src.write_text("dcba" * 30)  # same size, same characters, other text
    new = ready(make_dm(tmp_path, src))
    assert new.cache_path != old.cache_path and new.decode(new.train_set[0]) == "dcba"
    meta = json.loads((new.cache_path / "meta.json").read_text())
    assert meta["files"] == [["t.txt", 120, hashlib.sha256(b"dcba" * 30).hexdigest()]]
    assert (old.cache_path / "train.bin").read_bytes() == old_bytes  # a run still reading it is not disturbed
    src.write_text("abcd" * 30)  # back to the first text: its cache is found again, nothing rebuilt
    again = make_dm(tmp_path, src)
    assert again.cache_path == old.cache_path


def test_the_cache_key_holds_the_validation_corpus_too(tmp_path):
    src, val = tmp_path / "t.txt", tmp_path / "v.txt"
    src.write_text("abcd" * 30)
    val.write_text("abcd" * 10)
    first = ready(make_dm(tmp_path, src, val_source=str(val)))
    val.write_text("dcba" * 10)
    second = ready(make_dm(tmp_path, src, val_source=str(val)))
    assert second.cache_path != first.cache_path and second.decode(second.val_set[0]) == "dcba"


def test_resume_on_a_corpus_whose_vocabulary_has_the_same_size_is_refused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abc\n" * 40)
    b.write_text("abd\n" * 40)  # 4 characters each: the model's shapes fit, the ids would not
    state = ready(make_dm(tmp_path, a)).state_dict()
    assert state["data"]["chars"] == "\nabc"
    other = ready(make_dm(tmp_path, b))
    with pytest.raises(ValueError) as excinfo:
        other.load_state_dict(state)
    msg = one_line_error(excinfo)
    assert "only in the checkpoint: 'c'" in msg and "only in this corpus: 'd'" in msg
    assert "train.resume=never" in msg and str(b) in msg
    same = ready(make_dm(tmp_path, a))
    same.load_state_dict(state)  # the same data resumes
    assert same.consumed == 0
    gpt2 = ready(make_dm(tmp_path, a, tokenizer="gpt2"))
    with pytest.raises(ValueError, match=r"tokenizer .* -> .*vocab_size 4 -> 50257"):
        gpt2.load_state_dict(state)


def test_lightning_resume_on_another_vocabulary_is_refused(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 2)

        def training_step(self, batch, batch_idx):
            return self.emb(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(source: Path, ckpt: str | None = None) -> None:
        trainer = bare_trainer(tmp_path, 2 if ckpt is None else 4)
        trainer.fit(Tiny(), datamodule=make_dm(tmp_path, source), ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(tmp_path / "run.ckpt")

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abc\n" * 40)
    b.write_text("xyz\n" * 40)
    fit(a)
    with pytest.raises(ValueError, match="character vocabulary"):
        fit(b, str(tmp_path / "run.ckpt"))
    fit(a, str(tmp_path / "run.ckpt"))


# -- 2. a large .txt is tokenised a chunk at a time ------------------------------------------------------
TRICKY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\n"
    "  indented line\n\tTabbed\n \n trailing spaces   \nIt's won't they'll\r\nwindows line\r\n"
    "old mac\rline\n\n\nÉlan café naïve — “quotes” 日本語\n123 456\n!!! ???\n" + "x\n" * 3 + "\n"
)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_a_txt_corpus_in_many_small_chunks_equals_the_one_shot_tokenisation(tmp_path, tokenizer):
    src = tmp_path / "tricky.txt"
    src.write_bytes((TRICKY * 12).encode())
    whole = (TRICKY * 12).replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads it
    pieces = list(TextFiles([src], chunk_bytes=32).chunks(src))
    assert len(pieces) > 30 and "".join(pieces) == whole
    dm = make_dm(tmp_path, src, tokenizer=tokenizer, cache_dir=str(tmp_path / "small"))
    dm.txt_chunk_bytes = 32
    dm.prepare_data()
    tok = GPT2Tokenizer() if tokenizer == "gpt2" else CharTokenizer.from_text(whole)
    expected = tok.encode(whole) + ([tok.eos_id] if tok.eos_id is not None else [])
    assert stream(dm).tolist() == expected
    big = make_dm(tmp_path, src, tokenizer=tokenizer, cache_dir=str(tmp_path / "big"))  # one chunk
    big.prepare_data()
    assert np.array_equal(stream(big), stream(dm))


def test_txt_tokenisation_memory_does_not_grow_with_the_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "to", "be", "or", "not"]
    line = lambda: " ".join(rng.choice(words, 12)) + "\n"  # noqa: E731
    src = tmp_path / "big.txt"
    src.write_text("".join(line() for _ in range(60_000)))  # about 3 MB
    size, chunk = src.stat().st_size, 64 << 10
    assert size > 3_000_000
    docs, tok = TextFiles([src], chunk_bytes=chunk), CharTokenizer.from_text("".join(words) + " \n")
    tracemalloc.start()
    try:
        n = sum(len(ids) for ids in docs.token_blocks(tok))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == size  # one id per character, no EOS for char
    assert peak < 24 * chunk, f"peak {peak / 1e6:.1f} MB for {chunk >> 10} KiB chunks of a {size / 1e6:.1f} MB file"


# -- 3. bad data files: one clear message naming the file -------------------------------------------------
def test_a_binary_file_is_named_not_read(tmp_path):
    src = tmp_path / "model.txt"
    src.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 10)
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src).prepare_data()
    msg = one_line_error(excinfo)
    assert str(src) in msg and "looks binary" in msg and "offset" in msg


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_latin1_file_names_the_line_and_the_fix(tmp_path, suffix):
    src = tmp_path / f"old{suffix}"
    lines = ["plain line", "another", "café au lait"]
    if suffix == ".jsonl":
        lines = [json.dumps({"text": t}, ensure_ascii=False) for t in lines]
    src.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src).prepare_data()
    msg = one_line_error(excinfo)
    assert str(src) in msg and "not UTF-8" in msg and "line 3" in msg and "0xe9" in msg and "iconv" in msg


def test_a_broken_jsonl_line_is_named_by_number(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n{"text": "four"}\n')
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src).prepare_data()
    msg = one_line_error(excinfo)
    assert f"line 3 of {src} is not valid JSON" in msg


def test_a_jsonl_without_the_text_field_names_the_option(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(50)))
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src).prepare_data()
    msg = one_line_error(excinfo)
    assert "no field 'text'" in msg and "['content']" in msg and "data.text_field=content" in msg and str(src) in msg
    dm = ready(make_dm(tmp_path, src, text_field="content"))
    assert dm.decode(dm.train_set[0]) == "doc "


@pytest.mark.parametrize(("name", "content"), [("empty.txt", b""), ("blank.jsonl", b""), ("hollow.jsonl", b'{"text": ""}\n')])
@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_an_empty_corpus_is_named(tmp_path, name, content, tokenizer):
    src = tmp_path / name
    src.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src, tokenizer=tokenizer).prepare_data()
    msg = one_line_error(excinfo)
    assert "empty" in msg and str(src) in msg


def test_a_corpus_too_short_for_one_sequence_names_seq_len(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("0123456789" * 3)
    with pytest.raises(ValueError) as excinfo:
        ready(make_dm(tmp_path, src, seq_len=64))
    msg = one_line_error(excinfo)
    assert "27 tokens, fewer than the 64 needed" in msg and "data.seq_len=64" in msg and str(src) in msg


# -- 4. two processes building the same image token cache -------------------------------------------------
BUILDER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_images import PaletteVQ, S, F
    from data_modules.images import ImageDataConfig, ImageTokenDataModule

    class SlowVQ(PaletteVQ):
        def encode_to_ids(self, imgs, batch_size=64):
            time.sleep(0.05)  # long enough for the two builds to overlap
            return super().encode_to_ids(imgs, batch_size)

    tmp, me, other = Path({tmp!r}), sys.argv[1], sys.argv[2]
    cfg = ImageDataConfig(source=str(tmp / "imgs.npz"), cache_dir=str(tmp / "cache"), image_size=S,
                          seq_len=(S // F) ** 2, val_size=8, encode_batch_size=2)
    dm = ImageTokenDataModule(cfg, 4, tokenizer=SlowVQ())
    assert dm.prepare_data_per_node is False
    (tmp / me).touch()
    while not (tmp / other).exists():  # start together
        time.sleep(0.01)
    dm.prepare_data()
    dm.setup("fit")
    print(json.dumps({{s: hashlib.sha256((dm.cache_path / f"{{s}}.bin").read_bytes()).hexdigest() for s in ("train", "val")}}))
    """
)


def test_two_processes_building_one_image_cache_end_with_one_valid_cache(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_images import PaletteVQ, blocky
        from test_images import make_dm as image_dm
    finally:
        sys.path.remove(str(ROOT / "tests"))
    arr = blocky(40)
    np.savez(tmp_path / "imgs.npz", images=arr)
    script = tmp_path / "build.py"
    script.write_text(BUILDER.format(tests=str(ROOT / "tests"), tmp=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), me, other], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for me, other in (("a.ready", "b.ready"), ("b.ready", "a.ready"))
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    hashes = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert hashes[0] == hashes[1]
    logs = "".join(err for _, err in outs)
    assert logs.count("token cache ready") == 1 and "built by another process meanwhile" in logs
    # the cache equals a build by one process alone, and no temporary file is left
    ref = image_dm(tmp_path / "ref", tmp_path / "imgs.npz", PaletteVQ())
    ref.prepare_data()
    cache = tmp_path / "cache" / ref.cache_path.name
    for s in ("train", "val"):
        assert hashlib.sha256((cache / f"{s}.bin").read_bytes()).hexdigest() == hashes[0][s]
        assert (cache / f"{s}.bin").read_bytes() == (ref.cache_path / f"{s}.bin").read_bytes()
    meta, ref_meta = (json.loads((c / "meta.json").read_text()) for c in (cache, ref.cache_path))
    assert meta["rows"] == ref_meta["rows"] == {"train": 32, "val": 8} and meta["max_id"] == ref_meta["max_id"]
    assert not [p.name for p in cache.iterdir() if "tmp" in p.name]


# -- 5. an edited image of the same size --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_an_edited_image_of_the_same_size_rebuilds_into_a_new_image_cache(tmp_path, kind):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_images import PaletteVQ, blocky
        from test_images import make_dm as image_dm
    finally:
        sys.path.remove(str(ROOT / "tests"))
    arr = blocky(12)
    edited = arr.copy()
    edited[3, :4, :4] = 255 - edited[3, :4, :4]  # one block of image 3 in another palette colour

    def write(images: np.ndarray) -> Path:
        if kind == "npz":
            np.savez(tmp_path / "imgs.npz", images=images)
            return tmp_path / "imgs.npz"
        (tmp_path / "imgs").mkdir(exist_ok=True)
        for i, img in enumerate(images):  # stored, not deflated: an edit keeps the size in bytes
            Image.fromarray(img).save(tmp_path / "imgs" / f"{i:02d}.png", compress_level=0)
        return tmp_path / "imgs"

    def sizes(src: Path) -> list[int]:
        return [f.stat().st_size for f in sorted(src.rglob("*") if src.is_dir() else [src])]

    src = write(arr)
    before = sizes(src)
    old = image_dm(tmp_path, src, PaletteVQ(), val_size=2)
    old.prepare_data()
    old_bytes = (old.cache_path / "train.bin").read_bytes()
    write(edited)
    assert sizes(src) == before  # same names, same sizes: only the content tells them apart
    new = image_dm(tmp_path, src, PaletteVQ(), val_size=2)
    new.prepare_data()
    assert new.cache_path != old.cache_path
    assert (new.cache_path / "train.bin").read_bytes() != old_bytes
    meta = json.loads((new.cache_path / "meta.json").read_text())
    digest = meta["source_signature"][-1]
    assert len(digest) == 64 and new.cache_path.name.endswith(digest[:12])
    assert (old.cache_path / "train.bin").read_bytes() == old_bytes  # a run still reading it is not disturbed
    write(arr)  # back to the first images: their cache is found again
    assert image_dm(tmp_path, src, PaletteVQ(), val_size=2).cache_path == old.cache_path


# -- 6. a broken tokenizer file ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "why"),
    [(b'{"model": {"type": "BPE"', "EOF while parsing"), (b'{"a": 1}', "line 1"), (b"", "EOF"), (b"\xff\xfe\x00", "UTF-8")],
)
def test_a_broken_tokenizer_file_is_named_with_its_key(tmp_path, content, why):
    src, tok = tmp_path / "t.txt", tmp_path / "broken.json"
    src.write_text("abcd" * 30)
    tok.write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        make_dm(tmp_path, src, tokenizer=str(tok)).prepare_data()
    msg = one_line_error(excinfo)
    assert f"data.tokenizer={tok}: {tok} is not a Hugging Face tokenizer.json" in msg and why in msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("meta.json"))
