"""Patching features of a prompt pair and steering along a direction, from plain objects: a tiny random
Hugging Face Llama saved in a tmp folder, token strings, and an SAE as a Dictionary or a bare module."""
import pytest
import torch

from helpers.activations.models import embedded_model_dir, hooked
from helpers.causal.patching import Patched, patch_features, prompt_pairs
from helpers.causal.steering import Steered, steer
from helpers.dictionaries.dictionary import neuron_basis

HOOK = "blocks.0.hook_resid_post"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TEXT = ["The cat sat on the mat and looked at the door.", "It rained all day, so we stayed at home."]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random plain Hugging Face Llama (the embedded tokenizer's vocabulary), saved and loaded back."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tinyllama")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def bridge(hf):
    return hooked(hf)


@pytest.fixture(scope="module")
def answer(hf, bridge):
    """(right, wrong) token ids with a clear gap: the tokens the clean prompt favours most and least
    over the corrupted one (the model is random, so no name is its answer)."""
    with torch.no_grad():
        diff = (hf(bridge.to_tokens(CLEAN)).logits[0, -1].log_softmax(-1)
                - hf(bridge.to_tokens(CORRUPT)).logits[0, -1].log_softmax(-1))
    return int(diff.argmax()), int(diff.argmin())


class ExactSAE(torch.nn.Module):
    """A bare SAE module (encode/decode/W_dec, no workbook class) that reconstructs exactly: ReLU of
    ±each coordinate, decoded back."""

    def __init__(self, d):
        super().__init__()
        eye = torch.eye(d)
        self.W_enc = torch.nn.Parameter(torch.cat([eye, -eye], 1))
        self.W_dec = torch.nn.Parameter(torch.cat([eye, -eye], 0))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, c):
        return c @ self.W_dec + self.b_dec


@pytest.mark.parametrize("sae", [neuron_basis(64, hook_name=HOOK), ExactSAE(64)], ids=["dictionary", "module"])
def test_patching_every_feature_of_an_exact_sae_closes_the_gap_and_none_closes_nothing(hf, bridge, answer, sae):
    everything = patch_features(hf, CLEAN, CORRUPT, HOOK, sae, answer=answer, features=range(128), positions="all")
    none = patch_features(bridge, CLEAN, CORRUPT, HOOK, sae, answer=answer, features=[], positions="all")
    # the clean and corrupted logit differences are the plain HF model's own
    with torch.no_grad():
        lg = [hf(bridge.to_tokens(p)).logits[0, -1] for p in (CLEAN, CORRUPT)]
    assert everything.ld_clean == pytest.approx(float(lg[0][answer[0]] - lg[0][answer[1]]), abs=1e-4)
    assert everything.ld_corrupt == pytest.approx(float(lg[1][answer[0]] - lg[1][answer[1]]), abs=1e-4)
    assert everything.ld_clean - everything.ld_corrupt > 1.0
    assert everything.gap_closed.value == pytest.approx(1.0, abs=1e-3)
    assert everything.ld_patched == pytest.approx(everything.ld_corrupt, abs=1e-3)
    assert everything.captured == pytest.approx(1.0, abs=1e-5) and everything.ranked_by == "given"
    assert none.gap_closed.value == pytest.approx(0.0, abs=1e-5) and none.kl.value == pytest.approx(0.0, abs=1e-6)
    assert none.features == [] and none.ld_patched == pytest.approx(none.ld_clean, abs=1e-5)
    assert any("closes 1.000 of the gap" in v for v in everything.verdicts())
    # at the changed position only (the default), layer 0: part of the gap, not all of it
    changed = patch_features(bridge, CLEAN, CORRUPT, HOOK, sae, answer=answer, features=range(128))
    assert changed.positions == "changed" and changed.gap_closed.value < 0.999


def test_a_lossy_sae_keeps_its_error_term(bridge, answer):
    """A dictionary of the first 32 coordinates only: patching all its features moves those coordinates to
    the corrupted run's and keeps the other 32 (its reconstruction error) clean, as a patch by hand does."""
    from helpers.dictionaries.dictionary import LinearDictionary

    half = LinearDictionary(torch.eye(64)[:, :32], torch.eye(64)[:32], hook_name=HOOK)
    r = patch_features(bridge, CLEAN, CORRUPT, HOOK, half, answer=answer, features=range(64), positions="all")
    toks, cf = bridge.to_tokens(CLEAN), bridge.to_tokens(CORRUPT)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(cf, names_filter=[HOOK])
        x_cf = cache[HOOK]

        def by_hand(act, hook):
            out = act.clone()
            out[:, 1:, :32] = x_cf[:, 1:, :32]
            return out
        lg = bridge.run_with_hooks(toks, fwd_hooks=[(HOOK, by_hand)])[0, -1]
        _, cache = bridge.run_with_cache(toks, names_filter=[HOOK])
        dx = (x_cf - cache[HOOK])[0, 1:]
    assert r.ld_patched == pytest.approx(float(lg[answer[0]] - lg[answer[1]]), abs=1e-4)
    assert r.captured == pytest.approx(float(dx[:, :32].pow(2).sum() / dx.pow(2).sum()), abs=1e-5)
    assert 0.05 < r.captured < 0.95 and abs(r.gap_closed.value - 1) > 0.01


def test_top_k_by_attribution(bridge, answer):
    nb = neuron_basis(64, hook_name=HOOK)
    r = patch_features(bridge, CLEAN, CORRUPT, HOOK, nb, answer=answer, k=6, positions="all")
    assert r.ranked_by == "attribution" and len(r.features) == 6 == len(set(r.features))
    assert r.attribution == sorted(r.attribution) and r.attribution[0] < 0   # most negative first
    bigger = patch_features(bridge, CLEAN, CORRUPT, HOOK, nb, answer=answer, k=40, positions="all")
    assert bigger.features[:6] == r.features
    assert any("ranked on the prompts they were measured on" in v for v in r.verdicts())


def test_pairs_answers_and_round_trip(bridge, answer, tmp_path):
    nb = neuron_basis(64, hook_name=HOOK)
    right, wrong = (bridge.tokenizer.decode([a]) for a in answer)
    one = patch_features(bridge, CLEAN, CORRUPT, HOOK, nb, answer=answer, features=[0, 5, 70])
    # a list of (clean, corrupt) pairs, per-pair answers: the second pair is the first one swapped
    two = patch_features(bridge, [(CLEAN, CORRUPT), (CORRUPT, CLEAN)], hook=HOOK, sae=nb,
                         answer=([answer[0], answer[1]], [answer[1], answer[0]]), features=[0, 5, 70])
    assert two.n_prompts == 2 and two.gap_closed.has_interval and two.kl.has_interval
    assert two.per_prompt["clean"][0] == pytest.approx(one.ld_clean, abs=1e-4)
    assert two.per_prompt["clean"][1] == pytest.approx(-one.ld_corrupt, abs=1e-4)
    if bridge.tokenizer.encode(right, add_special_tokens=False) == [answer[0]] and \
            bridge.tokenizer.encode(wrong, add_special_tokens=False) == [answer[1]]:
        by_text = patch_features(bridge, CLEAN, CORRUPT, HOOK, nb, answer=(right, wrong), features=[0, 5, 70])
        assert by_text.to_dict() == one.to_dict()
    back = Patched.load(two.save(tmp_path / "patched.json"))
    assert back.to_dict() == two.to_dict() and back.gap_closed == two.gap_closed
    assert "gap closed" in two.to_frame().columns


def test_bad_pairs_and_answers(bridge, answer):
    nb = neuron_basis(64, hook_name=HOOK)
    with pytest.raises(ValueError, match="same number and token length"):
        patch_features(bridge, CLEAN, CORRUPT + " the store", HOOK, nb, answer=answer)
    with pytest.raises(ValueError, match="single tokens"):
        prompt_pairs(bridge, CLEAN, CORRUPT, answer=(" Mary Jane Watson", " John"))
    with pytest.raises(ValueError, match="answer must be"):
        prompt_pairs(bridge, CLEAN, CORRUPT, answer=None)
    with pytest.raises(ValueError, match="not 'blocks.1"):
        patch_features(bridge, CLEAN, CORRUPT, "blocks.1.hook_resid_post", nb, answer=answer)


def test_steering_at_scale_zero_is_the_model_and_a_large_scale_costs(bridge, tmp_path):
    nb = neuron_basis(64, hook_name=HOOK)
    zero = steer(bridge, "I think that", HOOK, sae=nb, feature=3, scale=0.0, n_new=8, cost_text=TEXT)
    big = steer(bridge, "I think that", HOOK, sae=nb, feature=3, scale=8.0, n_new=8, cost_text=TEXT)
    assert zero.steered == zero.unsteered == big.unsteered and zero.feature == 3
    assert zero.kl == pytest.approx(0.0, abs=1e-7) and zero.dce == pytest.approx(0.0, abs=1e-6)
    assert zero.n_cost_tokens == big.n_cost_tokens > 10 and zero.norm == big.norm > 0
    assert big.steered != big.unsteered and big.kl > 1e-3 and big.dce != 0
    assert any("does not change" in v for v in zero.verdicts())
    assert any("changes the continuation" in v for v in big.verdicts())
    # the feature's decoder direction, given as a plain direction, is the same steering
    d = steer(bridge, "I think that", HOOK, direction=5 * nb.directions[3], scale=8.0, n_new=8, cost_text=TEXT)
    assert (d.steered, d.kl, d.dce, d.feature) == (big.steered, big.kl, big.dce, None)
    # without a cost text there is no cost, and the unit of scale comes from the prompt
    bare = steer(bridge, "I think that", HOOK, direction=nb.directions[3], scale=8.0, n_new=8)
    assert bare.n_cost_tokens == 0 and bare.kl != bare.kl and bare.norm != big.norm
    back = Steered.load(big.save(tmp_path / "steered.json"))
    assert back.to_dict() == big.to_dict()


def test_cost_text_as_tokens_is_the_workbook_steering_cost(hf, bridge):
    from helpers.causal.steering import steering_cost, steering_vector

    nb = neuron_basis(64, hook_name=HOOK)
    toks = torch.stack([bridge.to_tokens(t)[0, :8] for t in TEXT])
    r = steer(hf, "I think that", HOOK, direction=nb.directions[7], scale=4.0, n_new=4, cost_text=toks, norm=2.0)
    want = steering_cost(bridge, toks, HOOK, steering_vector(nb.directions[7], 4.0, 2.0)[None])
    assert r.norm == 2.0 and r.kl == float(want.kl[0]) and r.dce == float(want.dce[0])
    assert r.n_cost_tokens == toks[:, 1:].numel() == want.n_tokens


def test_a_plain_hf_model_and_its_bridge_give_the_same_numbers(hf, bridge, answer):
    nb = neuron_basis(64, hook_name=HOOK)
    a = patch_features(hf, CLEAN, CORRUPT, HOOK, nb, answer=answer, k=4, positions="all")
    b = patch_features(bridge, CLEAN, CORRUPT, HOOK, nb, answer=answer, k=4, positions="all")
    assert a.to_dict() == b.to_dict()
    s = steer(hf, "I think that", HOOK, sae=nb, feature=9, scale=6.0, n_new=6, cost_text=TEXT)
    t = steer(bridge, "I think that", HOOK, sae=nb, feature=9, scale=6.0, n_new=6, cost_text=TEXT)
    assert s.to_dict() == t.to_dict()


def test_an_sae_folder_in_saelens_layout(hf, bridge, answer, tmp_path):
    """What a README reader has: a plain HF model and an SAE folder (SAELens layout), loaded by `load_sae`."""
    from helpers.dictionaries.dictionary import SAEDictionary, load_sae
    from helpers.saes.stack import SAEConfig, SAEStack

    sae = SAEDictionary(SAEStack([SAEConfig(64, 256, l1_coefficient=1e-3, hook_name=HOOK)], seed=0))
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    a = patch_features(hf, CLEAN, CORRUPT, sae=loaded, answer=answer, k=8)       # the hook: the SAE's own
    b = patch_features(bridge, CLEAN, CORRUPT, HOOK, sae, answer=answer, k=8)
    assert a.hook == HOOK and a.features == b.features and len(a.features) == 8
    assert a.gap_closed.value == pytest.approx(b.gap_closed.value, abs=1e-5)
    s = steer(hf, "I think that", sae=loaded, feature=a.features[0], scale=4.0, n_new=6, cost_text=TEXT)
    t = steer(bridge, "I think that", HOOK, direction=sae.directions[a.features[0]], scale=4.0, n_new=6, cost_text=TEXT)
    assert s.hook == HOOK and s.steered == t.steered and s.kl == pytest.approx(t.kl, abs=1e-6)
