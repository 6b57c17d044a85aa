"""The denoiser network: shapes, the vocabulary head only at hidden positions, no peeking."""

import pytest
import torch

from glauber.core.schedule import GlauberSchedule
from glauber.nn.ddit import DDiT, ModelConfig
from glauber.nn.ema import EMA

V, L, B = 11, 16, 3


def make(condition_on_alpha: bool = True, **kw) -> DDiT:
    torch.manual_seed(0)
    model = DDiT(ModelConfig(size="tiny", dropout=0.0, condition_on_alpha=condition_on_alpha, **kw), V).eval()
    for p in model.parameters():  # zero-initialised heads/gates would make every output equal
        torch.nn.init.normal_(p, std=0.2)
    return model


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, 3] = True
    mask[:, 9] = True
    return x, mask, torch.rand(B, generator=g), torch.rand(B, L, generator=g)


def test_output_shape_and_positions_form_matches_mask_form():
    model = make()
    x, mask, time, alpha = inputs()
    x_in = x.masked_fill(mask, V)
    h = model(x_in, mask, time, alpha)
    assert h.shape == (int(mask.sum()), V)
    pos = mask.nonzero()[:, 1].view(B, 2)
    assert torch.allclose(model(x_in, pos, time, alpha), h, atol=1e-6)


def test_changing_the_hidden_token_never_changes_the_output():
    model = make()
    x, mask, time, alpha = inputs()
    other = x.clone()
    other[mask] = (x[mask] + 1) % V
    h1 = model(x.masked_fill(mask, V), mask, time, alpha)
    h2 = model(other.masked_fill(mask, V), mask, time, alpha)
    assert torch.equal(h1, h2)
    # ...while the network does read the visible context, on both sides (bidirectional)
    for j in (0, L - 1):
        moved = x.clone()
        moved[:, j] = (x[:, j] + 1) % V
        assert not torch.allclose(model(moved.masked_fill(mask, V), mask, time, alpha), h1)


def test_head_runs_only_on_hidden_positions():
    model = make()
    calls = []
    model.norm_out.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    x, mask, time, alpha = inputs()
    model(x.masked_fill(mask, V), mask, time, alpha)
    assert calls == [torch.Size([int(mask.sum()), 64])]


def test_alpha_conditioning_is_used_and_required():
    model = make()
    x, mask, time, alpha = inputs()
    x_in = x.masked_fill(mask, V)
    assert not torch.allclose(model(x_in, mask, time, alpha), model(x_in, mask, time, alpha * 0.5))
    with pytest.raises(ValueError, match="condition_on_alpha"):
        model(x_in, mask, time)
    plain = make(condition_on_alpha=False)
    assert plain(x_in, mask, time).shape == (6, V)


def test_tied_head_and_bf16_autocast():
    model = make(tie_head=True)
    x, mask, time, alpha = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(x.masked_fill(mask, V), mask, time, alpha)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()
    assert model.num_parameters(non_embedding=False) < make().num_parameters(non_embedding=False)


def test_zero_initialised_network_starts_at_the_noise_law():
    """Fresh model: h = 0, so p_t(.|c) = softmax(log u) = u."""
    model = DDiT(ModelConfig(size="tiny"), V).eval()
    x, mask, time, alpha = inputs()
    assert torch.equal(model(x.masked_fill(mask, V), mask, time, alpha), torch.zeros(6, V))


def test_ema_update_and_scope_restore():
    lin = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(lin.weight, 1.0)
    ema = EMA(lin, decay=0.9)
    torch.nn.init.constant_(lin.weight, 2.0)
    ema.update(lin)
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), 1.1))
    with ema.scope(lin):
        assert torch.allclose(lin.weight, torch.full((1, 2), 1.1))
        with ema.scope(lin):  # re-entrant
            pass
        assert torch.allclose(lin.weight, torch.full((1, 2), 1.1))
    assert torch.allclose(lin.weight, torch.full((1, 2), 2.0))


def test_sizes_match_the_ddit_shapes():
    assert ModelConfig(size="small").resolved() == (768, 12, 12)
    assert ModelConfig(size="medium").resolved() == (1024, 24, 16)
    with pytest.raises(ValueError, match="model.size"):
        ModelConfig(size="huge").resolved()
    with pytest.raises(ValueError, match="multiple of model.heads"):
        ModelConfig(size="tiny", width=60, heads=8).resolved()
    sched = GlauberSchedule(L, 2)
    assert sched.num_steps == 2 * L


def test_causal_attention_is_causal_and_the_default_is_not():
    model = make(condition_on_alpha=False, causal=True)
    x, _, time, _ = inputs()
    h = model(x, None, time).view(B, L, V)
    for i in (0, 5, L - 2):
        moved = x.clone()
        moved[:, i + 1 :] = (x[:, i + 1 :] + 1) % (V + 1)  # every later token changes (the extra row included)
        h2 = model(moved, None, time).view(B, L, V)
        assert torch.allclose(h2[:, : i + 1], h[:, : i + 1], atol=1e-6)
        assert not torch.allclose(h2[:, i + 1 :], h[:, i + 1 :])
    # the same change reaches earlier positions when the attention is bidirectional
    plain = make(condition_on_alpha=False)
    moved = x.clone()
    moved[:, -1] = (x[:, -1] + 1) % V
    assert not torch.allclose(plain(moved, None, time).view(B, L, V)[:, 0], plain(x, None, time).view(B, L, V)[:, 0])


def test_causal_option_keeps_parameter_names():
    assert make(causal=True).state_dict().keys() == make().state_dict().keys()
    assert ModelConfig().causal is False


def test_all_positions_form_matches_an_all_true_mask():
    model = make(condition_on_alpha=False)
    x, _, time, _ = inputs()
    full = torch.ones(B, L, dtype=torch.bool)
    assert torch.allclose(model(x, None, time), model(x, full, time), atol=1e-6)


def test_key_value_cache_decoding_equals_the_causal_forward():
    model = make(condition_on_alpha=False, causal=True)
    x, _, time, _ = inputs()
    full = model(x, None, time).view(B, L, V)
    cache = model.new_cache(B, L)
    steps = torch.stack([model.decode_step(x[:, i], i, time, cache) for i in range(L)], dim=1)
    assert torch.allclose(steps, full, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        make().new_cache(B, L)


def test_learned_positions_break_translation_symmetry_and_check_length():
    from glauber.nn.ddit import DDiT, ModelConfig

    torch.manual_seed(0)
    net = DDiT(ModelConfig(size="tiny", dropout=0.0, learned_positions=8), vocab_size=5).eval()
    x = torch.full((1, 8), 2)
    hidden = torch.ones(1, 8, dtype=torch.bool)
    time = torch.ones(1)
    with torch.no_grad():
        net.head.weight.normal_()
        base = net(x, hidden, time)
        net.pos_embed.weight[3] += torch.randn(net.pos_embed.weight.shape[1])  # only position 3 changes
        moved = net(x, hidden, time)
    assert not torch.allclose(base[3], moved[3])
    assert torch.allclose(base[:3], moved[:3]) and torch.allclose(base[4:], moved[4:])  # the blocks start as identity
    with pytest.raises(ValueError, match="learned_positions=8"):
        net(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool), time)
