"""Passes that replace the whole activation at a hook skip the blocks before it, and give what the full
pass gives: on a tiny random Llama (the embedded model's architecture) and the simulated Colab run's
GPT-NeoX stand-in (the paper's Pythia)."""
import pytest
import torch

from colab_sim import write_model
from conftest import tiny_llama_model
from helpers.activations.hooks import blocks_before
from helpers.activations.models import hooked, skipping_blocks
from helpers.causal.patching import (_patched_last_logits, ce_losses, ce_losses_and_acts, ce_losses_edited,
                                     first_change, run_with_activation)
from helpers.evals.reconstruction import spliced_loss

HOOK = "blocks.1.hook_resid_post"  # the first two blocks are skipped
SKIPPED = 2


@pytest.fixture(scope="module", params=["llama", "neox"])
def model(request, tmp_path_factory):
    from transformers import AutoTokenizer, GPTNeoXForCausalLM, LlamaForCausalLM

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        _, tok = tiny_llama_model(folder)
        cfg = LlamaForCausalLM.config_class.from_pretrained(folder)
        cfg.num_hidden_layers = 3
        torch.manual_seed(0)
        return hooked(LlamaForCausalLM(cfg).eval(), tok)
    write_model(folder)  # 6 blocks
    return hooked(GPTNeoXForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder))


def calls(model, skipped: int, rest: int) -> list[int]:
    """MLP calls per block: `skipped` for the blocks before HOOK, `rest` for the others."""
    return [skipped] * SKIPPED + [rest] * (len(model.blocks) - SKIPPED)


class Calls:
    """Counts the calls of each block's MLP (a skipped block never reaches it), and the positions
    each call computed."""

    def __init__(self, model):
        self.n = [0] * len(model.blocks)
        self.positions = [[] for _ in model.blocks]
        self.handles = [b.mlp.register_forward_hook(self._hook(i)) for i, b in enumerate(model.blocks)]

    def _hook(self, i):
        def count(module, args, output):
            self.n[i] += 1
            self.positions[i].append(output.shape[1])
        return count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def tokens(model, n=6, T=10, seed=0):
    t = torch.randint(100, 5000, (n, T), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = model.tokenizer.bos_token_id
    return t


def test_blocks_before():
    assert blocks_before("blocks.6.hook_resid_post") == 7 and blocks_before("blocks.6.hook_out") == 7
    assert blocks_before("blocks.6.hook_resid_pre") == 6 and blocks_before("blocks.0.hook_in") == 0
    assert blocks_before("blocks.6.hook_mlp_out") == 0 and blocks_before("blocks.6.attn.hook_z") == 0
    assert blocks_before("hook_embed") == 0 and blocks_before("ln_final.hook_normalized") == 0
    assert blocks_before(HOOK) == SKIPPED


def replaced(model, toks, hook, act):
    """Logits of the full pass (every block computed) with the activation at `hook` replaced by `act`."""
    return model.run_with_hooks(toks, fwd_hooks=[(hook, lambda a, hook: act.to(a.dtype))])


@torch.no_grad()
def test_skipped_blocks_are_not_computed_and_the_logits_are_the_full_pass(model):
    toks = tokens(model)
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    act = cache[HOOK] * 1.5
    with Calls(model) as counted:
        full = replaced(model, toks, HOOK, act)
        assert counted.n == calls(model, 1, 1)
        with skipping_blocks(model, blocks_before(HOOK)):
            skipped = replaced(model, toks, HOOK, act)
        assert counted.n == calls(model, 1, 2)
        assert torch.equal(skipped, full)
        after = replaced(model, toks, HOOK, act)  # the blocks are back
        assert counted.n == calls(model, 2, 3) and torch.equal(after, full)
        assert torch.equal(run_with_activation(model, toks, HOOK, act), full)
        # the last position alone: unembedded by a matmul of another shape, equal up to float rounding
        assert torch.allclose(run_with_activation(model, toks, HOOK, act, last_only=True), full[:, -1], atol=1e-6)
        assert counted.n == calls(model, 2, 5)
    with pytest.raises(ValueError, match="replacement"):
        run_with_activation(model, toks, HOOK, act[:, 1:])


@torch.no_grad()
def test_splicing_skips_the_blocks_before_the_hook_and_gives_the_full_passes_figures(model):
    toks = tokens(model, seed=1)
    rec = lambda a: torch.stack([a * 0.5, a + 0.1])  # noqa: E731
    with Calls(model) as counted:
        out = spliced_loss(model, toks, HOOK, rec, batch_size=3)
    # per batch of 3 contexts: the clean pass computes every block; the four patches (zero, mean, two
    # reconstructions) share one pass that computes the blocks after the hook only
    assert counted.n == calls(model, 2, 4), counted.n
    # the figures of full passes: each patch spliced into a full run, BOS keeping its activation
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    x = cache[HOOK]
    t2 = toks[:, 2:]
    clean_logp = model(toks).float().log_softmax(-1)[:, 1:]

    def ce(new_rest):
        new = x.clone()
        new[:, 1:] = new_rest
        logp = replaced(model, toks, HOOK, new).float().log_softmax(-1)[:, 1:]
        return float(-logp[:, :-1].gather(-1, t2[..., None]).mean()), float((clean_logp.exp() * (clean_logp - logp)).sum(-1).mean())

    rest = x[:, 1:]
    zero, half, plus = ce(torch.zeros_like(rest)), ce(rest * 0.5), ce(rest + 0.1)
    assert out["ce_zero"] == pytest.approx(zero[0], rel=1e-5) and out["kl_zero"] == pytest.approx(zero[1], rel=1e-4)
    assert out["ce_sae"] == pytest.approx([half[0], plus[0]], rel=1e-5)
    assert out["kl_sae"] == pytest.approx([half[1], plus[1]], rel=1e-4)


@torch.no_grad()
def test_edits_of_given_activations_skip_the_blocks_before_the_hook(model):
    toks = tokens(model, n=5, seed=3)
    fns = [lambda a: a, torch.zeros_like, lambda a: a * 0.3]
    ce, count, acts = ce_losses_and_acts(model, toks, HOOK, batch_size=2)
    assert torch.equal(ce, ce_losses(model, toks)[0]) and torch.equal(count, ce_losses(model, toks)[1])
    full = ce_losses_edited(model, toks, HOOK, fns, batch_size=2)
    with Calls(model) as counted:
        given = ce_losses_edited(model, toks, HOOK, fns, batch_size=2, acts=acts)
    assert counted.n == calls(model, 0, 3), counted.n  # one pass per batch of 2 sequences, after the hook only
    for a, b in zip(full, given):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a, b)
    assert torch.allclose(given[0], ce, rtol=1e-6)  # the identity edit is the clean run
    with pytest.raises(ValueError, match="not the activations"):
        ce_losses_edited(model, toks, HOOK, fns, acts=acts[:3])


@torch.no_grad()
def test_patched_runs_compute_the_positions_before_the_first_change_once(model):
    toks = tokens(model, n=4, T=10, seed=2)
    _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    x = cache[HOOK]
    g = torch.Generator().manual_seed(0)
    acts = [x.clone() for _ in range(3)]
    acts[0][:, 6:] += torch.randn(acts[0][:, 6:].shape, generator=g)
    acts[1][:, 8] *= 2.0
    acts[2][:, 9:] = 0.0
    assert first_change(acts, x) == 6 and first_change(acts[1:], x) == 8 and first_change([x], x) == 9
    full = _patched_last_logits(model, toks, HOOK, acts)  # every position of every patched run
    with Calls(model) as counted:
        shared = _patched_last_logits(model, toks, HOOK, acts, clean=x)
    # one plain pass over positions 0-5 (every block), then the three patched runs in one pass over
    # positions 6-9 only (the blocks after the hook)
    assert counted.positions == [[6]] * SKIPPED + [[6, 4]] * (len(model.blocks) - SKIPPED), counted.positions
    for act, a, b in zip(acts, full, shared):  # the logits of the full passes, up to float rounding
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(replaced(model, toks, HOOK, act)[:, -1].float(), b, atol=1e-5)
