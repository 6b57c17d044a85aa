"""A local Hugging Face judge (a tiny random GPT-2 built offline) gives the hand-computed perplexity and nll per
byte; per-token byte counts of the judges' tokenizers; nll per byte ranks what per-token perplexity misranks."""

from __future__ import annotations

import math

import pytest
import torch

from glauber.eval.judges import HFJudge, evaluate_texts, token_bytes

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from tiny_judge import make_tiny_judge

    return make_tiny_judge(tmp_path_factory.mktemp("judge"))


def test_local_judge_matches_direct_computation(judge_dir):
    judge = HFJudge(str(judge_dir))
    assert judge.eos_id == 50256 and judge.max_length == 16
    texts = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog again and again, and again and again."]
    res = evaluate_texts(texts, judge)
    nll, count, nbytes, per_seq = 0.0, 0, 0, []
    for t in texts:
        ids = torch.tensor(judge.tokenizer(t)["input_ids"][:16])[None]
        with torch.no_grad():
            logits = judge.model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
        nll, count = nll - float(lp.sum()), count + lp.numel()
        per_seq.append(math.exp(-float(lp.mean())))
        kept, first = judge.tokenizer.decode(ids[0]), judge.tokenizer.decode(ids[0, :1])  # the second text is cut to 16
        assert t.startswith(kept) and t.startswith(first)
        nbytes += len(kept.encode()) - len(first.encode())  # the text after the first token, within the context
    assert res["scored_tokens"] == count
    assert res["gen_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["gen_ppl_per_seq"] == pytest.approx(sum(per_seq) / 2, rel=1e-5)
    assert 0 < res["unigram_entropy"] < math.log(16)
    assert res["scored_bytes"] == nbytes == (28 - 5) + (74 - 3)  # "Hello" and "The" are the first tokens
    assert res["nll_per_byte"] == pytest.approx(nll / nbytes, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert res["ppl_per_byte"] == pytest.approx(math.exp(nll / nbytes), rel=1e-5)
    assert res["nll_per_byte"] * res["scored_bytes"] == pytest.approx(math.log(res["gen_ppl"]) * res["scored_tokens"], rel=1e-9)


TRICKY = "Héllo 😀😀 wörld 日本語 naïve\u200b ñ 𝔘𝔫𝔦<|endoftext|>café<|endoftext|><|endoftext|> end"


def test_token_bytes_are_what_each_token_adds_to_the_decoded_text(judge_dir):
    from data_modules.tokenizers import CharTokenizer, GPT2Tokenizer

    judge = HFJudge(str(judge_dir))
    ids = judge.tokenizer(TRICKY, add_special_tokens=False)["input_ids"]
    assert judge.tokenizer.convert_ids_to_tokens(ids).count("<|endoftext|>") == 3  # special tokens are tokens
    (got,) = token_bytes([ids], judge.decode)
    prefix = [len(t.encode()) for t in judge.decode([ids[:j] for j in range(len(ids) + 1)])]
    assert got == [b - a for a, b in zip(prefix, prefix[1:])]  # the 8-token window equals whole prefixes
    assert sum(got) == len(TRICKY.encode()) and min(got) < 1  # a token completing a character split by BPE
    gpt2 = GPT2Tokenizer()  # a GPT-2 checkpoint judge's tokenizer counts the same
    assert token_bytes([gpt2.encode(TRICKY)], lambda rows: [gpt2.decode(r) for r in rows]) == [got]
    chars = CharTokenizer(list("aé€😀"))
    assert token_bytes([chars.encode("a€😀é")], lambda rows: [chars.decode(r) for r in rows]) == [[1, 3, 4, 2]]


class LengthJudge(HFJudge):
    """A unigram judge, ``p(v) ∝ exp(-bytes of v)``: each token costs its bytes plus ``log Z`` nats, so short
    tokens are cheap per token (as near-random characters are under a real judge) and dear per byte."""

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return -self.sizes().expand(*ids.shape, -1)

    def sizes(self) -> torch.Tensor:
        tokens = self.tokenizer.convert_ids_to_tokens(range(len(self.tokenizer)))
        return torch.tensor([len(t) for t in tokens], dtype=torch.float64)  # byte-level BPE: a character per byte


def test_nll_per_byte_ranks_text_that_gen_ppl_per_token_misranks(judge_dir):
    judge = LengthJudge(str(judge_dir))
    log_z = float(torch.logsumexp(-judge.sizes(), 0))
    real = evaluate_texts(["The government announced that the new national policy would take effect next month."], judge)
    noise = evaluate_texts(["qz xv jk wq zx kj vq xz jq kv zq wx fj pq"], judge)
    for res in (real, noise):  # by hand: nll = bytes + tokens * log Z
        n, b = res["scored_tokens"], res["scored_bytes"]
        assert res["gen_ppl"] == pytest.approx(math.exp(b / n + log_z), rel=1e-9)
        assert res["nll_per_byte"] == pytest.approx(1 + n * log_z / b, rel=1e-9)
    assert noise["scored_bytes"] / noise["scored_tokens"] < 3 < 5 < real["scored_bytes"] / real["scored_tokens"]
    assert noise["gen_ppl"] < real["gen_ppl"]  # per token the noise looks better...
    assert noise["nll_per_byte"] > real["nll_per_byte"] and noise["ppl_per_byte"] > real["ppl_per_byte"]  # ...per byte, worse


def test_offline_hub_judge_error_says_how_to_pass_a_local_one(monkeypatch):
    import glauber.eval.judges as judges

    monkeypatch.setattr(judges, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ValueError, match="--judge /path/to/a/local/model_dir"):
        HFJudge("nobody/no-such-judge-model")


def test_eval_ppl_command_end_to_end(judge_dir, tmp_path, capsys):
    import json

    from glauber.commands.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox.\n" for i in range(200)))
    tiny = [
        "experiments/tiny.yaml",
        f"data.source={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.max_steps=2",
    ]
    assert main(["train", *tiny]) == 0
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval-ppl",
                str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                "--judge",
                str(judge_dir),
                "--num-samples",
                "3",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["num_samples"] == 3 and report["final_draw"] == "float64" and report["network_calls"] == 32
    assert report["gen_ppl"] > 1 and report["scored_tokens"] > 0
    assert report["ppl_per_byte"] > 1 and report["scored_bytes"] > 0 and "nll_per_byte" in report["averaging"]
    assert report["bits_per_byte"] == pytest.approx(report["nll_per_byte"] / math.log(2))
    assert f"bits, PPL/byte {report['ppl_per_byte']:.4f})" in capsys.readouterr().out  # the printed summary
    assert out.with_suffix(".samples.txt").read_text().count("--- sample") == 3


def test_training_logs_gen_ppl_every_k_steps(judge_dir, tmp_path):
    import json
    from pathlib import Path

    from glauber.config import load_config
    from glauber.training.train import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox.\n" for i in range(200)))
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml",
        [
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            f"eval.judge={judge_dir}",
            "eval.every_steps=2",
            "eval.num_samples=2",
        ],
    )
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "eval" / "gen_ppl.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["gen_ppl"] > 1 and r["num_samples"] == 2 and r["unigram_entropy"] > 0 for r in rows)
    assert all(r["nll_per_byte"] > 0 and r["scored_bytes"] > 0 for r in rows)
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"eval/gen_ppl", "eval/nll_per_byte", "eval/bits_per_byte", "eval/ppl_per_byte", "eval/entropy"} <= set(header)
