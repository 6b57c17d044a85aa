"""Generative perplexity, nll per byte and unigram entropy against hand computations, and DDP synchronisation."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glauber.eval.metrics import GenerativePerplexity, UnigramEntropy, unigram_entropy

V, EOS = 7, 6
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def bigram_judge(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A judge whose next-token logits depend on the current token only."""
    return TABLE[ids]


IDS = torch.tensor([[1, 2, 3, 6, 4, 6, 6], [5, 6, 0, 1, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 1, 0, 0], [1] * 7])
BYTES = IDS + 1  # token v covers v + 1 bytes of text


def hand_scores() -> list[list[tuple[float, int]]]:
    """Per sequence, the scored (nll, bytes) pairs, written out the slow way."""
    out = []
    for row, m in zip(IDS.tolist(), MASK.tolist()):
        n = sum(m)
        seen_eos = False
        scores = []
        for j in range(n):
            if row[j] == EOS:
                first = not seen_eos
                seen_eos = True
                if not first:
                    continue
            if j == 0:
                continue
            logp = TABLE[row[j - 1]] - torch.logsumexp(TABLE[row[j - 1]], 0)
            scores.append((-float(logp[row[j]]), row[j] + 1))
        out.append(scores)
    return out


def test_gen_ppl_matches_hand_computation_both_averages():
    metric = GenerativePerplexity(bigram_judge, eos_id=EOS)
    metric.update(IDS[:2], MASK[:2], token_bytes=BYTES[:2])
    metric.update(IDS[2:], MASK[2:], token_bytes=BYTES[2:])
    res = metric.compute()
    scores = hand_scores()
    assert [len(s) for s in scores] == [4, 4, 6]  # first token never; EOS only its first time; padding not
    flat = [x for s in scores for x, _ in s]
    assert res["gen_ppl"].item() == pytest.approx(math.exp(sum(flat) / len(flat)), rel=1e-12)
    per_seq = sum(math.exp(sum(x for x, _ in s) / len(s)) for s in scores) / 3
    assert res["gen_ppl_per_seq"].item() == pytest.approx(per_seq, rel=1e-12)
    assert res["scored_tokens"].item() == 14


def test_nll_per_byte_matches_hand_computation_and_shares_gen_ppl_nll():
    metric = GenerativePerplexity(bigram_judge, eos_id=EOS)
    metric.update(IDS, MASK, token_bytes=BYTES)
    res = metric.compute()
    scored = [b for s in hand_scores() for _, b in s]
    # never a first token, nor row 0's later EOS (7 bytes), nor row 1's padding
    assert scored == [3, 4, 7, 5, 7, 1, 2, 3, 4, 4, 4, 4, 4, 4] and res["scored_bytes"].item() == sum(scored) == 56
    nll = sum(x for s in hand_scores() for x, _ in s)
    assert res["nll_per_byte"].item() == pytest.approx(nll / 56, rel=1e-12)
    assert res["bits_per_byte"].item() == pytest.approx(nll / 56 / math.log(2), rel=1e-12)
    assert res["ppl_per_byte"].item() == pytest.approx(math.exp(nll / 56), rel=1e-12)
    total_nll = math.log(res["gen_ppl"].item()) * res["scored_tokens"].item()  # the nll behind gen_ppl
    assert res["nll_per_byte"].item() * res["scored_bytes"].item() == pytest.approx(total_nll, rel=1e-12)


def test_gen_ppl_truncates_to_the_judge_context():
    metric = GenerativePerplexity(bigram_judge, eos_id=None, max_length=3)
    metric.update(IDS[2:], token_bytes=BYTES[2:])
    expected = -float((TABLE[3] - torch.logsumexp(TABLE[3], 0))[3])
    assert metric.compute()["gen_ppl"].item() == pytest.approx(math.exp(expected), rel=1e-12)
    assert metric.compute()["scored_tokens"].item() == 2
    assert metric.compute()["scored_bytes"].item() == 8 and metric.compute()["nll_per_byte"].item() == pytest.approx(expected / 4)


def test_unigram_entropy_by_hand():
    h = unigram_entropy(torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 2, 3]]))
    assert torch.allclose(h, torch.tensor([math.log(2), 0.0, math.log(4)], dtype=torch.float64))
    m = UnigramEntropy()
    m.update(torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]]))
    assert m.compute().item() == pytest.approx(math.log(2) / 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gen, ent = GenerativePerplexity(bigram_judge, eos_id=EOS), UnigramEntropy()
        rows = [0, 2] if rank == 0 else [1]
        gen.update(IDS[rows], MASK[rows], token_bytes=BYTES[rows])
        ent.update(IDS[rows])
        res = gen.compute()
        out[rank] = (res["gen_ppl"].item(), res["gen_ppl_per_seq"].item(), res["nll_per_byte"].item(), ent.compute().item())
    finally:
        dist.destroy_process_group()


def test_ddp_synchronised_result_equals_single_process():
    single, ent = GenerativePerplexity(bigram_judge, eos_id=EOS), UnigramEntropy()
    single.update(IDS, MASK, token_bytes=BYTES)
    ent.update(IDS)
    res = single.compute()
    expected = (res["gen_ppl"].item(), res["gen_ppl_per_seq"].item(), res["nll_per_byte"].item(), ent.compute().item())
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == pytest.approx(expected, rel=1e-12)
    assert results[1] == pytest.approx(expected, rel=1e-12)
