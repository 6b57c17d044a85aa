"""Tokenizers, the resumable sampler, and the text DataModule's cache, layout, splits, resume and errors."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from corpus import bare_trainer

import data_modules.corpus as corpus
import data_modules.hub as hub
import data_modules.paths as paths
import data_modules.text as text
from data_modules.sampling import ResumableSampler
from data_modules.text import TextDataConfig, TextDataModule
from data_modules.tokenizers import CharTokenizer, GPT2Tokenizer, HubUnreachableError, load_tokenizer, tokenizer_from_state

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
DOCS = [f"Document {i} talks about {'cats' if i % 2 else 'dogs'} and the number {i * i}." for i in range(60)]


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


@pytest.fixture()
def shakespeare_char(tmp_path_factory):
    """Tiny Shakespeare, character level, one cache shared by the tests that read it."""
    cache = tmp_path_factory.getbasetemp() / "shared-cache"
    return dict(source=str(SHAKESPEARE), tokenizer="char", wrap="none", seq_len=32, cache_dir=str(cache))


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def make_dm(
    tmp_path: Path, source: Path | str, batch_size: int = 4, max_train_samples: int | None = None, **cfg
) -> TextDataModule:
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    return TextDataModule(TextDataConfig(source=str(source), **cfg), batch_size=batch_size, max_train_samples=max_train_samples)


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(loader) -> list[torch.Tensor]:
    return [b.clone() for b in loader]


# -- tokenizers --------------------------------------------------------------------------------------
def test_gpt2_known_ids_and_special_token(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id) == (50257, 50256, 50256)
    assert gpt2.decode([15496, 995]) == "Hello world"


def test_gpt2_fingerprint_is_stable_and_state_round_trips(gpt2):
    again = load_tokenizer(str(paths.PROJECT_ROOT / "src/glauber/assets/gpt2/tokenizer.json"))
    assert again.fingerprint() == gpt2.fingerprint()
    restored = tokenizer_from_state(json.loads(json.dumps(gpt2.state())))
    assert restored.fingerprint() == gpt2.fingerprint() and restored.encode("Hello world") == [15496, 995]


def test_gpt2_hub_offline_says_use_bundled(monkeypatch):
    import huggingface_hub

    import data_modules.tokenizers as toks

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(toks, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(HubUnreachableError, match="data.tokenizer=gpt2"):
        load_tokenizer("gpt2-hub")


def test_char_round_trip_serialisation_and_unknown_char():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.chars == sorted(set("hello world\n")) and tok.bos_id is None and tok.eos_id is None
    ids = tok.encode("low hello")
    assert tok.decode(ids) == "low hello" and max(ids) < tok.vocab_size
    back = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back.encode("low hello") == ids and back.fingerprint() == tok.fingerprint()
    assert tokenizer_from_state(tok.state()).fingerprint() == tok.fingerprint()
    assert CharTokenizer.from_text("abc").fingerprint() != CharTokenizer.from_text("abd").fingerprint()
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("hez")


def test_unknown_tokenizer_spec():
    with pytest.raises(ValueError, match="gpt2, gpt2-hub, char"):
        load_tokenizer("bpe-of-my-dreams")


# -- sampler -----------------------------------------------------------------------------------------
def reference_stream(N: int, seed: int, count: int) -> list[int]:
    """Global draw g -> randperm(N, seed + g // N)[g % N], spelled out."""
    out = []
    for g in range(count):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + g // N))
        out.append(int(perm[g % N]))
    return out


def test_sampler_follows_the_global_stream_across_epochs_and_ranks():
    N, W, per_rank = 7, 2, 12  # N not divisible by W; several epochs
    ranks = [list(ResumableSampler(N, per_rank, seed=5, rank=r, world_size=W)) for r in range(W)]
    interleaved = [ranks[n % W][n // W] for n in range(W * per_rank)]
    assert interleaved == reference_stream(N, 5, W * per_rank)
    assert len(ResumableSampler(N, per_rank, seed=5)) == per_rank


def test_sampler_ranks_are_disjoint_and_cover_an_epoch():
    N, W = 1000, 2
    a, b = (list(ResumableSampler(N, N // W, seed=0, rank=r, world_size=W)) for r in range(W))
    assert not set(a) & set(b) and sorted(a + b) == list(range(N))


def test_sampler_is_deterministic_seeded_and_resumable():
    full = list(ResumableSampler(50, 130, seed=3))
    assert full == list(ResumableSampler(50, 130, seed=3)) and full != list(ResumableSampler(50, 130, seed=4))
    for k in (0, 1, 49, 50, 77, 130):
        assert list(ResumableSampler(50, 130, seed=3, start=k)) == full[k:]
    s = ResumableSampler(50, 130, seed=3)
    s.set_start(61)
    assert list(s) == full[61:] and len(s) == 130
    assert list(ResumableSampler(5, 7, seed=0, shuffle=False)) == [0, 1, 2, 3, 4, 0, 1]


# -- layout and splits -------------------------------------------------------------------------------
def test_bos_eos_layout_and_none_windows_share_one_cache(tmp_path, gpt2):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    stream = [t for d in DOCS for t in gpt2.encode(d) + [gpt2.eos_id]]
    cut = len(stream) - round(0.1 * len(stream))
    L = 16
    dm = ready(make_dm(tmp_path, src, seq_len=L, wrap="bos_eos"))
    assert len(dm.train_set) == cut // (L - 2)
    for k in (0, 1, len(dm.train_set) - 1):
        seq = dm.train_set[k]
        assert seq.dtype == torch.long and seq.shape == (L,)
        assert seq[0] == gpt2.bos_id and seq[-1] == gpt2.eos_id
        assert seq[1:-1].tolist() == stream[k * (L - 2) : (k + 1) * (L - 2)]
    meta_mtime = (dm.cache_path / "meta.json").stat().st_mtime_ns
    none = ready(make_dm(tmp_path, src, seq_len=10, wrap="none"))
    assert none.cache_path == dm.cache_path and (dm.cache_path / "meta.json").stat().st_mtime_ns == meta_mtime
    assert len(none.train_set) == cut // 10
    assert [none.train_set[k].tolist() for k in (0, 3)] == [stream[0:10], stream[30:40]]
    val = torch.cat(batches(none.val_dataloader())).reshape(-1).tolist()
    assert val == stream[cut : cut + len(val)] and len(val) == (len(stream) - cut) // 10 * 10


def test_local_split_sizes_and_token_counts(shakespeare_char):
    dm = ready(TextDataModule(TextDataConfig(**shakespeare_char), batch_size=4))
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    corpus = SHAKESPEARE.read_text()
    assert meta["tokens"] == {"train": len(corpus) - round(0.1 * len(corpus)), "val": round(0.1 * len(corpus))}
    assert len(dm.train_set) == meta["tokens"]["train"] // 32 and len(dm.val_set) == meta["tokens"]["val"] // 32
    counts = dm.token_counts()
    assert counts.dtype == torch.float64 and counts.shape == (dm.vocab_size,) == (65,)
    assert counts.sum() == meta["tokens"]["train"]
    assert counts[dm.encode("e")[0]] > counts[dm.encode("z")[0]] > 0
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["state"]["chars"] == "".join(sorted(set(corpus)))


def test_hub_train_only_split_takes_last_documents_as_validation(tmp_path, monkeypatch, gpt2):
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(
        corpus, "load_hub", lambda name, timeout_s, cache: DatasetDict({"train": Dataset.from_dict({"text": DOCS})})
    )
    dm = ready(make_dm(tmp_path, "someone/corpus", seq_len=8, val_documents=5))
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    enc = [len(gpt2.encode(d)) + 1 for d in DOCS]
    assert meta["tokens"] == {"train": sum(enc[:-5]), "val": sum(enc[-5:])}
    assert meta["documents"] == {"train": 55, "val": 5} and dm.cache_path.name.startswith("someone_corpus-")
    val = np.fromfile(dm.cache_path / "val.bin", dtype=np.uint16).tolist()
    assert val == [t for d in DOCS[-5:] for t in gpt2.encode(d) + [gpt2.eos_id]]


def test_explicit_val_source(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("abcabcabc" * 20)
    val = tmp_path / "val.txt"
    val.write_text("cab" * 10)
    dm = ready(make_dm(tmp_path, train, tokenizer="char", wrap="none", seq_len=6, val_source=str(val)))
    assert json.loads((dm.cache_path / "meta.json").read_text())["tokens"] == {"train": 180, "val": 30}
    assert dm.decode(dm.val_set[0]) == "cabcab"


# -- the cache ---------------------------------------------------------------------------------------
def test_cache_is_reused_and_keyed_by_tokenizer(tmp_path, monkeypatch):
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    dm = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8))
    stamp = (dm.cache_path / "train.bin").stat().st_mtime_ns

    def no_build(*a, **k):
        raise AssertionError("re-tokenised a complete cache")

    monkeypatch.setattr(text, "build_cache", no_build)
    again = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8))
    assert (again.cache_path / "train.bin").stat().st_mtime_ns == stamp
    assert again.tokenizer.fingerprint() == dm.tokenizer.fingerprint()
    monkeypatch.undo()
    other = ready(make_dm(tmp_path, src, tokenizer="gpt2", seq_len=8))
    assert other.cache_path != dm.cache_path and other.vocab_size == 50257


@pytest.mark.parametrize("damage", ["leftover_temp_no_meta", "truncated_bin"])
def test_interrupted_build_is_rebuilt_not_used(tmp_path, damage):
    src = tmp_path / "t.txt"
    src.write_text("abcdefgh" * 50)
    dm = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8))
    cache = dm.cache_path
    good = (cache / "train.bin").read_bytes()
    if damage == "leftover_temp_no_meta":
        (cache / "meta.json").unlink()
        (cache / "train.bin.tmp999").write_bytes(b"\x00" * 10)
    else:
        (cache / "train.bin").write_bytes(good[: len(good) // 2])
    dm2 = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8))
    assert (cache / "train.bin").read_bytes() == good and not list(cache.glob("*.tmp*"))
    assert dm2.decode(dm2.train_set[0]) == "abcdefgh"


def test_changed_corpus_rebuilds(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abab" * 30)
    ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=4))
    src.write_text("xyzxyz" * 30)
    dm = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=4))
    assert dm.tokenizer.chars == ["x", "y", "z"]


def test_char_tokenizer_comes_back_from_the_cache_without_the_corpus(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("to be or not to be\n" * 20)
    chars = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8)).tokenizer.chars
    src.unlink()
    dm = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=8))
    assert dm.tokenizer.chars == chars and dm.decode(dm.train_set[0]) == "to be or"


def test_cache_with_ids_out_of_range_or_another_tokenizer_is_refused(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcd" * 40)
    cache = ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=4)).cache_path
    ids = np.fromfile(cache / "train.bin", dtype=np.uint16)
    ids[3] = 4  # vocabulary is a, b, c, d
    ids.tofile(cache / "train.bin")
    with pytest.raises(ValueError, match=r"holds id 4 >= vocab_size 4.*delete"):
        ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=4))
    meta = json.loads((cache / "meta.json").read_text())
    meta["tokenizer"]["spec"] = "gpt2"
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="built with tokenizer 'gpt2'"):
        ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=4))


# -- errors ------------------------------------------------------------------------------------------
def test_missing_local_files_lists_what_was_looked_for(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match=r"looked for .*nowhere/corpus\.txt.*data\.source="):
        make_dm(tmp_path, missing).prepare_data()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        make_dm(tmp_path, tmp_path / "*.jsonl").prepare_data()


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_empty_corpus(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ValueError, match="empty"):
        make_dm(tmp_path, src, tokenizer=tokenizer, wrap="none").prepare_data()


def test_corpus_shorter_than_one_sequence(tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("0123456789" * 3)  # 30 characters: 27 train tokens
    with pytest.raises(ValueError, match=r"has 27 tokens, fewer than the 64 needed.*seq_len"):
        ready(make_dm(tmp_path, src, tokenizer="char", wrap="none", seq_len=64))


def test_wrap_bos_eos_with_char_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.wrap=none"):
        make_dm(tmp_path, SHAKESPEARE, tokenizer="char", wrap="bos_eos")


def test_offline_hub_dataset_fails_fast_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s: False)
    monkeypatch.setattr(hub, "cached_snapshot", lambda name: None)
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError, match=r"unreachable.*data\.source=/path/to/local/files.*copy"):
        make_dm(tmp_path, "Skylion007/openwebtext").prepare_data()
    assert time.monotonic() - t0 < 10


# -- DataModule: loaders, ranks, resume ----------------------------------------------------------------
def test_resume_continues_the_exact_batch_stream(shakespeare_char):
    def dm(**kw):
        d = TextDataModule(TextDataConfig(**shakespeare_char), batch_size=4, max_train_samples=40, **kw)
        d.prepare_data()
        d.setup("fit")
        return d

    full = batches(dm().train_dataloader())
    assert len(full) == 10 and len({tuple(b[0].tolist()) for b in full}) == 10
    resumed = dm()
    resumed.set_consumed(12)
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed.train_dataloader()), full[3:], strict=True))
    state = resumed.state_dict()
    fresh = dm()
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(fresh.train_dataloader()), full[3:], strict=True))
    loader = fresh.train_dataloader()
    fresh.set_consumed(36)  # after the loader exists: its next iteration starts there
    assert all(torch.equal(a, b) for a, b in zip(batches(loader), full[9:], strict=True))
    workers = dm()
    workers.cfg.num_workers = 2  # the memmap reopens in each worker process; same batches
    assert all(torch.equal(a, b) for a, b in zip(batches(workers.train_dataloader()), full, strict=True))


def test_two_ranks_get_disjoint_train_and_val_data(shakespeare_char):
    loaders = []
    for rank in range(2):
        d = TextDataModule(TextDataConfig(**shakespeare_char), batch_size=8)
        d.trainer = SimpleNamespace(global_rank=rank, world_size=2, training=False)
        d.prepare_data()
        d.setup("fit")
        loaders.append((d.train_dataloader(), d.val_dataloader(), d))
    (t0, v0, d), (t1, v1, _) = loaders
    n = len(d.train_set)
    assert len(t0.sampler) == len(t1.sampler) == n // 2
    i0, i1 = list(t0.sampler), list(t1.sampler)
    assert not set(i0) & set(i1) and len(set(i0) | set(i1)) == 2 * (n // 2)
    j0, j1 = list(v0.sampler), list(v1.sampler)
    assert len(j0) == len(j1) == len(d.val_set) // 2 and not set(j0) & set(j1)
    # a checkpoint from 2 ranks resumed on 1 continues at the same global position
    d.trainer = None
    d.load_state_dict({"consumed_train_samples": 10, "world_size": 2})
    assert d.consumed == 20


def test_lightning_resume_from_a_checkpoint_replays_nothing_and_skips_nothing(shakespeare_char, tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(65, 4)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.clone())
            return self.emb(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps: int, ckpt: str | None = None, save: str | None = None) -> tuple[list, TextDataModule]:
        dm = TextDataModule(TextDataConfig(**shakespeare_char, num_workers=1), batch_size=4, max_train_samples=100)
        module = Tiny()
        trainer = bare_trainer(tmp_path, steps)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module.seen, dm

    straight, _ = fit(4)
    first, dm = fit(2, save=str(tmp_path / "half.ckpt"))
    assert dm.state_dict()["consumed_train_samples"] == 2 * 4
    second, dm = fit(4, ckpt=str(tmp_path / "half.ckpt"))
    assert dm.state_dict()["consumed_train_samples"] == 4 * 4
    assert len(first + second) == 4 and all(torch.equal(a, b) for a, b in zip(first + second, straight))
