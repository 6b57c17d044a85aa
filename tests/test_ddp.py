"""Two-process DDP on CPU (gloo), the processes launched here the way torchrun/srun would (LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT set), each calling ``glauber.training.train.train`` on experiments/tiny.yaml.

What "the same as one process" means: with the global batch fixed (4 = 2 ranks x 2), a 2-process run
equals a 1-process run with gradient accumulation 2 in which micro-batch k of each step holds the
sequences that rank k draws and uses the noise/dropout seeds that rank k uses (``step_generator`` seeds by
rank by design, so a plain accumulation run draws other noise and is not comparable step by step). The
gradients are then the same numbers summed in another order (all-reduce vs. accumulation), so the weights
agree to float32 rounding, not bit for bit.

Run as a script (``python tests/test_ddp.py OUT.json OVERRIDE...``) this file is one DDP worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from corpus import corpus_overrides
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"
CORPUS = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))
WORLD = 2
STEPS = 6


def judge_dir(root: Path) -> Path:
    """A tiny random GPT-2 judge saved locally (tests/tiny_judge.py, as tests/test_judges.py uses)."""
    pytest.importorskip("transformers")
    from tiny_judge import make_tiny_judge

    return make_tiny_judge(root / "judge")


def overrides(tmp: Path, run: str) -> list[str]:
    return [
        *corpus_overrides(tmp, CORPUS),
        f"train.run_dir={tmp / run}",
        f"train.max_steps={STEPS}",
        "train.val_every_steps=3",
        "sample.num_samples=3",  # uneven split over 2 ranks: 2 + 1
        f"eval.judge={judge_dir(tmp)}",
        "eval.every_steps=3",
        "eval.num_samples=3",
    ]


# -- the worker ---------------------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.train_indices: list[int] = []
        self.val_indices: list[int] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_indices = list(trainer.train_dataloader.sampler)
        self.val_indices = list(trainer.val_dataloaders.sampler)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.tolist())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # the micro-batch's mean loss

    def on_fit_end(self, trainer, pl_module) -> None:
        from glauber.training.callbacks import GenerativePerplexityEval, ValidationSamples

        samples = next(cb for cb in trainer.callbacks if isinstance(cb, ValidationSamples))
        gen_ppl = next((cb for cb in trainer.callbacks if isinstance(cb, GenerativePerplexityEval)), None)
        self.result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "losses": self.losses,
            "train_indices": self.train_indices,
            "val_indices": self.val_indices,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "samples": samples.last_ids.tolist(),
            "gen_ppl": gen_ppl.last_report if gen_ppl else None,
            "num_train": len(trainer.datamodule.train_set),
            "dataset_rows": {i: trainer.datamodule.train_set[i].tolist() for i in self.train_indices},
        }


def _worker(out: str, args: list[str]) -> None:
    from glauber.config import load_config
    from glauber.training.train import train

    rec = Recorder()
    cfg = load_config(TINY, [*args, "train.accelerator=cpu", f"train.devices={WORLD}", "train.strategy=ddp"])
    train(cfg, extra_callbacks=[rec])
    import torch.distributed as dist

    assert not dist.is_initialized(), "train() must close the process group"
    Path(out).write_text(json.dumps(rec.result))


# -- the fixture: one DDP run and its 1-process reference ---------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InterleavedRanks(torch.utils.data.Sampler):
    """Micro-batch k of each step = the next ``batch`` draws of rank k's sampler (k = 0..W-1)."""

    def __init__(self, samplers: list, batch: int) -> None:
        self.samplers, self.batch = samplers, batch

    def __len__(self) -> int:
        return sum(len(s) for s in self.samplers)

    def __iter__(self):
        its = [iter(s) for s in self.samplers]
        while True:
            for it in its:
                chunk = list(islice(it, self.batch))
                if len(chunk) < self.batch:
                    return
                yield from chunk


def reference_run(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One process, accumulation 2 (micro batch 2), micro-batch k = rank k's data and seeds."""
    import glauber.training.train as gt
    from data_modules.sampling import ResumableSampler
    from data_modules.text import TextDataModule
    from glauber.config import load_config
    from glauber.methods.ggm import GGMModule

    class RanksDM(TextDataModule):
        def train_dataloader(self):
            if self.train_set is None:
                self.setup("fit")
            per_rank = self.max_train_samples // WORLD
            ranks = [ResumableSampler(len(self.train_set), per_rank, self.cfg.seed, r, WORLD) for r in range(WORLD)]
            return self._loader(self.train_set, self.batch_size, InterleavedRanks(ranks, self.batch_size), drop_last=True)

    class RanksGGM(GGMModule):
        """Sees micro-batch j (0-based) as rank ``j % W``'s micro-batch number ``j // W`` would be seen."""

        _as_rank: int | None = None

        @property
        def global_rank(self) -> int:
            return self._as_rank if self._as_rank is not None else super().global_rank

        def on_train_batch_start(self, batch, batch_idx):
            j = self.micro_batches_seen  # this micro-batch's index; rank j % W has seen j // W before its own
            self._as_rank, self.micro_batches_seen = j % WORLD, j // WORLD
            try:
                return super().on_train_batch_start(batch, batch_idx)  # counts it, seeds dropout as that rank
            finally:
                self._as_rank, self.micro_batches_seen = None, j + 1

        def training_step(self, batch, batch_idx):
            j = self.micro_batches_seen - 1
            self._as_rank, self.micro_batches_seen = j % WORLD, j // WORLD + 1
            try:
                return super().training_step(batch, batch_idx)  # step_generator seeded as that rank
            finally:
                self._as_rank, self.micro_batches_seen = None, j + 1

    monkeypatch.setitem(gt.MODALITIES, "text", (RanksDM, gt.text_callbacks))
    monkeypatch.setattr(gt, "method_class", lambda name: RanksGGM)
    cfg = load_config(TINY, [*overrides(tmp, "reference"), "train.micro_batch_size=2", "eval.judge=null"])
    rec = Recorder()
    gt.train(cfg, extra_callbacks=[rec])
    return rec.result


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    args = overrides(tmp, "ddp")
    # the cache is built by rank 0 while rank 1 waits; build it here so both start alike
    from data_modules.text import TextDataModule
    from glauber.config import load_config

    TextDataModule(load_config(TINY, args).data, batch_size=2).prepare_data()
    port = _free_port()
    procs, outs = [], []
    start = time.time()
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(WORLD),
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        outs.append(tmp / f"rank{rank}.json")
        log = (tmp / f"rank{rank}.log").open("w")
        cmd = [sys.executable, __file__, str(outs[-1]), *args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    yield {"tmp": tmp, "procs": procs, "outs": outs, "start": start}
    for p in procs:
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def results(ddp_run):
    """Both ranks' records, and the 1-process reference run (trained here while the workers run)."""
    tmp = ddp_run["tmp"]
    with pytest.MonkeyPatch.context() as mp:
        ref = reference_run(tmp, mp)
    for rank, p in enumerate(ddp_run["procs"]):
        try:
            rc = p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        assert rc == 0, f"rank {rank} exited with {rc}:\n" + (tmp / f"rank{rank}.log").read_text()[-4000:]
    ranks = [json.loads(o.read_text()) for o in ddp_run["outs"]]
    print(f"2-process DDP run + 1-process reference: {time.time() - ddp_run['start']:.1f} s")
    return {"ranks": ranks, "run": tmp / "ddp", "reference": tmp / "reference", "ref": ref}


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# -- the tests ------------------------------------------------------------------------------------
def test_ddp_matches_one_process_with_accumulation(results):
    ddp, ref = _ckpt(results["run"] / "checkpoints" / "last.ckpt"), _ckpt(results["reference"] / "checkpoints" / "last.ckpt")
    assert ddp["global_step"] == ref["global_step"] == STEPS
    assert ddp["glauber"]["micro_batches_seen"] == STEPS and ref["glauber"]["micro_batches_seen"] == STEPS * WORLD
    a, b = ddp["state_dict"], ref["state_dict"]
    assert a.keys() == b.keys()
    first = _ckpt(results["reference"] / "checkpoints" / "step00000001.ckpt")["state_dict"]
    for k in a:
        # float32 rounding only: the same gradient summed in another order
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert max(float((a[k] - first[k]).abs().max()) for k in a) > 1e-3  # the weights did move after step 1
    for x, y in zip(ddp["glauber"]["ema"]["shadow"], ref["glauber"]["ema"]["shadow"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the loss curves: rank k's loss at step s = the reference's micro-batch k of step s
    ref_losses = results["ref"]["losses"]
    assert len(ref_losses) == STEPS * WORLD
    for r in results["ranks"]:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses[r["rank"] :: WORLD]), rtol=1e-4, atol=1e-5)


def test_ddp_ranks_get_disjoint_data(results):
    r0, r1 = results["ranks"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, WORLD)
    t0, t1 = r0["train_indices"], r1["train_indices"]
    assert len(t0) == len(t1) == STEPS * 2 and not set(t0) & set(t1)
    # rank r takes draws r, r + 2, ... of the one global stream: together, the first 24 draws of one process
    from data_modules.sampling import ResumableSampler

    one = list(ResumableSampler(r0["num_train"], STEPS * 4, seed=0))
    assert t0 == one[0::2] and t1 == one[1::2]
    assert set(r0["val_indices"]).isdisjoint(r1["val_indices"]) and r0["val_indices"] and r1["val_indices"]
    for r in (r0, r1):  # each rank trained on exactly its own indices, in order
        rows = [r["dataset_rows"][str(i)] for i in r["train_indices"]]
        assert [row for batch in r["batches"] for row in batch] == rows


def test_ddp_samples_and_metrics_agree_across_ranks(results):
    r0, r1 = results["ranks"]
    assert r0["global_step"] == r1["global_step"] == STEPS
    assert len(r0["samples"]) == 3 and r0["samples"] == r1["samples"]  # 2 drawn on rank 0, 1 on rank 1, gathered
    assert r0["samples"][2] not in r0["samples"][:2]  # rank 1 drew with its own seed
    assert r0["gen_ppl"] == r1["gen_ppl"] and r0["gen_ppl"]["num_samples"] == 3 and r0["gen_ppl"]["gen_ppl"] > 1
    assert r0["metrics"]["val/loss"] == r1["metrics"]["val/loss"]
    for key in ("eval/gen_ppl", "eval/entropy"):
        assert key not in r0["metrics"] or r0["metrics"][key] == r1["metrics"][key]


def test_ddp_val_loss_by_noise_agrees_across_ranks(results):
    r0, r1 = results["ranks"]
    buckets = [{k: v for k, v in r["metrics"].items() if k.startswith("val/loss_t")} for r in (r0, r1)]
    assert buckets[0] and buckets[0] == buckets[1]


def test_ddp_only_rank_zero_writes(results):
    run = results["run"]
    rows = [json.loads(line) for line in (run / "eval" / "gen_ppl.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # one line per evaluation, not one per rank
    body = (run / "samples" / "step_00000006.txt").read_text()
    assert body.count("--- sample") == 3
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000003.txt", "step_00000006.txt"]
    assert not list(run.glob("hpc_ckpt_*.ckpt")) and (run / "config.yaml").is_file()


def test_rank_share_splits_every_sample_once():
    from glauber.training.callbacks import rank_share

    for total in range(0, 9):
        for world in range(1, 5):
            shares = [rank_share(total, r, world) for r in range(world)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1
    assert rank_share(5, 0, 1) == 5


@pytest.mark.parametrize("devices, nodes", [(1, 1), (2, 1), (4, 2), ("0,1", 2), (8, 4)])
def test_global_batch_is_the_same_for_any_devices_and_nodes(devices, nodes):
    from glauber.config import batch_layout, load_config
    from glauber.training.train import world_size

    gpu = ["train.accelerator=gpu"] if devices == "0,1" else []  # device ids are GPU ids (a CPU run takes a count)
    cfg = load_config(
        TINY,
        [f"train.devices={devices}", f"train.num_nodes={nodes}", "train.global_batch_size=64", "train.micro_batch_size=4", *gpu],
    )
    W = world_size(cfg)
    assert W == (2 if devices == "0,1" else devices) * nodes
    per_device, accumulate = batch_layout(64, W, 4)
    assert per_device * accumulate * W == 64 and per_device <= 4
    with pytest.raises(ValueError, match="not divisible by devices x nodes"):
        batch_layout(64, 3 * nodes, None)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
