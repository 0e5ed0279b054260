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
