"""A local Hugging Face judge (a tiny random GPT-2 built offline) gives the hand-computed perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from glauber.judges import HFJudge, evaluate_texts

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from tiny_judge import make_tiny_judge

    return make_tiny_judge(tmp_path_factory.mktemp("judge"))


def test_local_judge_matches_direct_computation(judge_dir):
    judge = HFJudge(str(judge_dir))
    assert judge.eos_id == 50256 and judge.max_length == 16
    texts = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog again and again and again."]
    res = evaluate_texts(texts, judge)
    nll, count, per_seq = 0.0, 0, []
    for t in texts:
        ids = torch.tensor(judge.tokenizer(t)["input_ids"][:16])[None]
        with torch.no_grad():
            logits = judge.model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
        nll, count = nll - float(lp.sum()), count + lp.numel()
        per_seq.append(math.exp(-float(lp.mean())))
    assert res["scored_tokens"] == count
    assert res["gen_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["gen_ppl_per_seq"] == pytest.approx(sum(per_seq) / 2, rel=1e-5)
    assert 0 < res["unigram_entropy"] < math.log(16)


def test_offline_hub_judge_error_says_how_to_pass_a_local_one(monkeypatch):
    import glauber.judges as judges

    monkeypatch.setattr(judges, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ValueError, match="--judge /path/to/a/local/model_dir"):
        HFJudge("nobody/no-such-judge-model")


def test_eval_ppl_command_end_to_end(judge_dir, tmp_path):
    import json

    from glauber.cli import main

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
    assert out.with_suffix(".samples.txt").read_text().count("--- sample") == 3


def test_training_logs_gen_ppl_every_k_steps(judge_dir, tmp_path):
    import json
    from pathlib import Path

    from glauber.config import load_config
    from glauber.train import train

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
    assert "eval/gen_ppl" in (run / "logs" / "metrics.csv").read_text().splitlines()[0]
