"""The tensor-level reconstruction metrics and CE-loss recovered: the numbers of the stack-level
conveniences on the same inputs, known cases, a plain Hugging Face Llama, and JSON round trips."""
import pytest
import torch
from torch import nn

from conftest import tiny_llama_model

from helpers.dictionaries.dictionary import as_dictionary, neuron_basis
from helpers.evals.reconstruction import (CELossRecovered, FVU, Reconstruction, ce_loss_recovered, fvu,
                                          reconstruction, reconstruction_metrics, split_fvu, spliced_loss)
from helpers.activations.massive import fit_tensor
from helpers.saes.stack import SAEConfig, SAEStack

HOOK = "blocks.0.hook_resid_post"


def data(n=1200, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[::29] += 40 * torch.ones(d)  # massive rows
    return x


def random_sae(d=8, f=24, seed=3):
    sae = SAEStack([SAEConfig(d, f)], seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.copy_(torch.randn(1, d, generator=torch.Generator().manual_seed(seed)))
    return sae


def test_fvu_equals_split_fvu_and_a_hand_computation():
    x = data()
    x_hat = x + 0.3 * torch.randn_like(x)
    flags = x.norm(dim=-1) > 20
    r = fvu(x, x_hat, flags)
    d = split_fvu((x_hat - x).pow(2).sum(-1), x, flags)
    assert (r.fvu, r.fvu_ordinary, r.fvu_massive, r.massive_share) == (d["fvu"], d["fvu_ordinary"], d["fvu_massive"],
                                                                       d["massive_share"])
    o = ~flags
    by_hand = float((x_hat - x)[o].pow(2).sum() / (x[o] - x[o].mean(0)).pow(2).sum())
    assert r.fvu_ordinary == pytest.approx(by_hand, rel=1e-6)
    assert r.fvu_massive is not None and r.massive_share == pytest.approx(float(flags.double().mean()))
    plain = fvu(x, x_hat)
    assert plain.fvu == r.fvu and plain.fvu_massive is None and plain.massive_share == 0
    assert fvu(x, x).fvu == 0
    with pytest.raises(ValueError, match="x_hat"):
        fvu(x, x_hat[:, :3])


def test_reconstruction_equals_reconstruction_metrics():
    x = data()
    sae = random_sae()
    flags = x.norm(dim=-1) > 20
    for fl in (None, flags):
        r = reconstruction(sae, x, flags=fl, batch_size=256)
        assert isinstance(r, Reconstruction) and r.n_tokens == len(x)
        assert r.to_metrics() == reconstruction_metrics(sae, x, batch_size=256, flags=fl)[0]
    # through the stack's own massive rule: its flags split the tokens
    sae.set_massive(fit_tensor(x))
    r = reconstruction(sae, x, batch_size=256)
    assert r.massive_share == pytest.approx(float(flags.double().mean())) and r.fvu_massive is not None
    assert r.to_metrics() == reconstruction_metrics(sae, x, batch_size=256)[0]
    # as a SAEDictionary, the same numbers
    assert reconstruction(as_dictionary(sae), x, batch_size=256) == r


def test_reconstruction_of_any_encode_decode_module():
    x = data(d=6)

    class Halves(nn.Module):  # a reader's SAE: codes are ReLU(±x), decode rebuilds half of x
        def __init__(self):
            super().__init__()
            self.W_dec = nn.Parameter(0.5 * torch.cat([torch.eye(6), -torch.eye(6)]))

        def encode(self, x):
            return torch.relu(torch.cat([x, -x], -1))

        def decode(self, c):
            return c @ self.W_dec

    r = reconstruction(Halves(), x, batch_size=100)
    assert r.fvu == pytest.approx(fvu(x, 0.5 * x).fvu, rel=1e-6)
    assert r.l0 == pytest.approx(float((x != 0).sum(-1).double().mean()))
    assert r.dead == 0 and r.massive_share == 0
    # a LinearDictionary with a massive rule adds the offset back: the neuron basis is then exact
    exact = reconstruction(neuron_basis(6, massive=fit_tensor(x)), x)
    assert exact.fvu < 1e-10 and exact.massive_share > 0 and exact.fvu_ordinary < 1e-10


def test_results_round_trip(tmp_path):
    x = data()
    r = reconstruction(random_sae(), x, flags=x.norm(dim=-1) > 20)
    assert Reconstruction.load(r.save(tmp_path / "r.json")) == r
    f = fvu(x, x * 0.9)
    assert FVU.load(f.save(tmp_path / "f.json")) == f
    assert "variance unexplained" in str(r) and r.to_frame().shape[0] == 1


# ---- CE-loss recovered on a tiny plain Hugging Face Llama --------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_llama_model(tmp_path_factory.mktemp("tinyllama"))


def tokens_of(tok, n=6, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(100, 5000, (n, T), generator=g)
    t[:, 0] = tok.bos_token_id
    return t


def test_ce_loss_recovered_identity_and_zero(tiny_llama, tmp_path):
    model, tok = tiny_llama
    tokens = tokens_of(tok)
    ident = ce_loss_recovered(model, tokens, HOOK, lambda x: x, batch_size=4, n_boot=50)
    assert ident.recovered_zero.value == 1.0 and ident.recovered_mean.value == 1.0
    assert ident.ce_sae.value == ident.ce_clean.value and ident.kl_sae.value == 0
    zero = ce_loss_recovered(model, tokens, HOOK, torch.zeros_like, batch_size=4, n_boot=50)
    assert zero.recovered_zero.value == 0.0 and zero.ce_sae.value == zero.ce_zero.value
    assert zero.ce_zero.value != zero.ce_clean.value and zero.kl_zero.value > 0
    assert zero.ce_zero.has_interval and zero.ce_zero.low <= zero.ce_zero.value <= zero.ce_zero.high
    assert ident.n_contexts == 6 and ident.n_tokens == 6 * 8
    back = CELossRecovered.load(zero.save(tmp_path / "ce.json"))
    assert back == zero and "recovers" in str(back)


def test_ce_loss_recovered_matches_spliced_loss(tiny_llama):
    model, tok = tiny_llama
    from helpers.activations.models import hooked

    tokens = tokens_of(tok, seed=1)
    sae = random_sae(d=64, f=128, seed=5)
    r = ce_loss_recovered(model, tokens, HOOK, sae, batch_size=4, n_boot=20)
    old = spliced_loss(hooked(model), tokens, HOOK, lambda a: sae(a), batch_size=4)
    for key, est in (("ce_clean", r.ce_clean), ("ce_zero", r.ce_zero), ("ce_mean", r.ce_mean),
                     ("kl_zero", r.kl_zero), ("kl_mean", r.kl_mean)):
        assert est.value == pytest.approx(old[key], rel=1e-5), key
    assert r.ce_sae.value == pytest.approx(old["ce_sae"][0], rel=1e-5)
    assert r.kl_sae.value == pytest.approx(old["kl_sae"][0], rel=1e-4)
    assert r.recovered_zero.value == pytest.approx(old["ce_recovered"][0], rel=1e-3, abs=1e-4)
    # a given mean-ablation vector is used as given
    m = ce_loss_recovered(model, tokens, HOOK, sae, mean_act=torch.zeros(64), batch_size=4, n_boot=0)
    assert m.ce_mean.value == pytest.approx(r.ce_zero.value, rel=1e-6) and not m.ce_mean.has_interval


def test_patches_spliced_in_one_pass_give_what_one_pass_each_gives(tiny_llama):
    """Several reconstructions (and the zero and mean ablations) spliced into copies of the contexts in one
    forward pass: each gets the CE and KL it gets alone, in its own order."""
    model, tok = tiny_llama
    from helpers.activations.models import hooked

    tokens = tokens_of(tok, n=5, seed=2)
    saes = [random_sae(d=64, f=128, seed=s) for s in (5, 6, 7)]
    rec = lambda a: torch.stack([a * 0.5] + [s(a)[0] for s in saes])  # noqa: E731
    apart = spliced_loss(hooked(model), tokens, HOOK, rec, batch_size=2, max_tokens=1)
    together = spliced_loss(hooked(model), tokens, HOOK, rec, batch_size=2)
    assert len(set(apart["ce_sae"])) == 4  # four different patches: a mix-up would show
    # equal up to float32 rounding (a pass of more rows may sum in another order); KL, a difference of
    # nearly equal log-probabilities, keeps fewer exact digits than CE
    for key in ("ce_clean", "ce_zero", "ce_mean", "ce_sae"):
        assert together[key] == pytest.approx(apart[key], rel=1e-6), key
    for key in ("kl_zero", "kl_mean", "kl_sae"):
        assert together[key] == pytest.approx(apart[key], rel=1e-4), key


def test_ablations_are_run_as_asked_and_reused_from_an_earlier_call(tiny_llama):
    """The zero and mean ablations are reference patches: left out they read NaN (and so does what is recovered
    against them), given by an earlier call on the same tokens they are not run again, with the same numbers."""
    model, tok = tiny_llama
    from helpers.activations.models import hooked

    model = hooked(model)
    tokens = tokens_of(tok, n=4, seed=4)
    sae = random_sae(d=64, f=128, seed=5)
    rows = []
    model.blocks[-1].hook_out.add_hook(lambda act, hook: rows.append(len(act)), is_permanent=True)
    try:
        full = spliced_loss(model, tokens, HOOK, lambda a: sae(a), batch_size=4, max_tokens=1)
        assert rows == [4, 4, 4, 4]  # clean, zero, mean, the SAE
        rows.clear()
        again = spliced_loss(model, tokens, HOOK, lambda a: sae(a), batch_size=4, max_tokens=1, refs=full)
        assert rows == [4, 4] and again == full  # clean and the SAE only
        rows.clear()
        mean_only = spliced_loss(model, tokens, HOOK, lambda a: sae(a), batch_size=4, max_tokens=1, ablations=("mean",))
        assert rows == [4, 4, 4]
    finally:
        model.blocks[-1].hook_out.remove_hooks(including_permanent=True)
    assert mean_only["ce_mean"] == full["ce_mean"] and mean_only["ce_recovered_mean"] == full["ce_recovered_mean"]
    assert all(v != v for v in (mean_only["ce_zero"], mean_only["kl_zero"], *mean_only["ce_recovered"]))
    with pytest.raises(ValueError, match="choose among"):
        spliced_loss(model, tokens, HOOK, lambda a: sae(a), ablations=("zero", "random"))


def test_edits_run_together_cost_what_each_costs_alone(tiny_llama):
    from helpers.activations.models import hooked
    from helpers.causal.patching import ce_losses, ce_losses_edited

    model, tok = tiny_llama
    model = hooked(model)
    tokens = tokens_of(tok, n=5, seed=3)
    fns = [lambda a: a, torch.zeros_like, lambda a: a * 0.3, lambda a: a + 1.0]
    alone = [ce_losses(model, tokens, HOOK, fn, batch_size=2)[0] for fn in fns]
    together = ce_losses_edited(model, tokens, HOOK, fns, batch_size=2)
    assert len({round(float(a.sum()), 3) for a in alone}) == 4  # four different edits: a mix-up would show
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a, b)


def test_ce_loss_recovered_from_strings(tiny_llama):
    model, tok = tiny_llama
    texts = ["The cat sat on the mat and looked at the door.", "A small dog ran across the quiet street today."]
    r = ce_loss_recovered(model, texts, HOOK, lambda x: x, tokenizer=tok, n_boot=10)
    assert r.n_contexts == 2 and r.recovered_zero.value == 1.0
