import pytest


@pytest.fixture(scope="session")
def model():
    """The embedded model, loaded once for the whole session (dequantised once into the cache)."""
    from helpers import load_model

    return load_model(device="cpu")


@pytest.fixture
def array_store(tmp_path):
    """Factory: write an activation store holding the rows of x [n, d] for one hook."""
    import numpy as np

    from helpers.activations.store import META_DTYPE, StoreWriter

    def make(x, hook="blocks.0.hook_resid_post", shard_tokens=256, name="store", dtype="float16"):
        w = StoreWriter(tmp_path / name, {"model": "toy", "corpus": "brown", "split": "train", "ctx_len": 9,
                                          "seed": 0, "hooks": [hook], "d_model": x.shape[1], "dtype": dtype})
        for s, i in enumerate(range(0, len(x), shard_tokens)):
            chunk = x[i:i + shard_tokens]
            meta = np.zeros(len(chunk), dtype=META_DTYPE)
            meta["token"] = np.arange(i, i + len(chunk))
            w.write_shard(meta, {hook: chunk}, first_context=s, n_contexts=1)
        return w.finish()

    return make


def sparse_data(n=4096, d=16, m=48, per_token=3, seed=0):
    """Synthetic activations: each row is a sparse non-negative mix of m unit ground-truth features."""
    import torch

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(m, d, generator=g)
    feats /= feats.norm(dim=-1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:per_token] for _ in range(n)])
    coef = torch.rand(n, per_token, generator=g) * 2 + 0.5
    x = torch.zeros(n, d)
    for j in range(per_token):
        x += coef[:, j:j + 1] * feats[idx[:, j]]
    return x, feats


def tiny_llama_model(folder, perturb: float = 0.0):
    """A tiny random Hugging Face Llama (d_model 64, 2 layers) with the embedded SmolLM2 tokenizer, saved
    in `folder` and loaded back: (model, tokenizer). `perturb` adds Gaussian noise of that scale to every
    weight (so that no weight is left at its initial value, as after training)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from helpers.activations.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval(), tok
