"""One interface for every set of directions we study: SAE features and the baselines.

A `Dictionary` has unit `directions` [n_features, d_in] in the model's activation space and an
`encode` from activations [N, d_in] to non-negative codes [N, n_features] (a feature's
"activation"); `decode` maps codes back where the method has one. Statistics, dashboards and
scores (notebook 03), baselines (04) and patching (05) take any Dictionary unchanged.

The rule for methods with signed codes (PCA, ICA, neurons, random directions): each direction
becomes two features, its positive half ReLU(s) and its negative half ReLU(-s) (direction -v),
so "activation" means the same thing for every method: how strongly the token points along the
feature's direction, zero when it does not.

Devices: a dictionary computes where its tensors live (`device`); `to(device)` moves it. Helpers that
take a dictionary compute on its device (`device_of`), move what they create there, and return CPU
tensors or numpy arrays.

Massive activations (helpers.activations.massive) get one treatment for every method: an SAE removes the massive
offset from flagged tokens before encoding (its own rule, saved with it), and a LinearDictionary
given a `massive` rule does the same, so no method's codes are dominated by the massive tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from helpers.activations.store import StoreMismatch
from helpers.saes.stack import SAEStack, load_saelens, save_saelens


def device_of(obj) -> torch.device:
    """The device an SAE, a dictionary or a model computes on: its `device` attribute where it has one
    (a Dictionary, a SAELens SAE), else its first parameter's or buffer's, else the CPU."""
    dev = getattr(obj, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    for get in ("parameters", "buffers"):
        t = next(iter(getattr(obj, get, lambda: ())()), None)
        if t is not None:
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def encode_batched(dictionary, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """`dictionary.encode(x)` [N, n_features] as float32 on the CPU: encoded in batches on the
    dictionary's device (any object with `encode`: a Dictionary, an SAE)."""
    dev = device_of(dictionary)
    return torch.cat([dictionary.encode(x[i:i + batch_size].to(dev)).float().cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, dictionary.n_features)


class Dictionary:
    name: str = "dictionary"
    hook_name: str = ""
    model_name: str = ""

    @property
    def directions(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.directions.device

    def to(self, device):
        """Move the dictionary to `device` (in place) and return it."""
        raise NotImplementedError(f"{self.name} cannot move between devices")

    @property
    def d_in(self) -> int:
        return self.directions.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no decoder")

    @property
    def decoder_rows(self) -> torch.Tensor:
        """[n_features, d_in]: decode(c) = bias + c @ decoder_rows, so changing feature f's code by
        δ moves the activation by δ · decoder_rows[f] (what patching and ablation use)."""
        raise NotImplementedError(f"{self.name} has no linear decoder")

    def check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have d_model={x.shape[-1]}, but {self.name} has d_in={self.d_in} "
                             f"(fitted on {self.hook_name or 'another hook'})")

    def check_store(self, store, hook: str | None = None) -> str:
        """The hook to read from `store` for this dictionary; raise if the store does not fit it."""

        hook = hook or self.hook_name
        if self.model_name and store.manifest["model"] != self.model_name:
            raise StoreMismatch(f"{self.name} was fitted on model {self.model_name!r}, but the store at "
                                f"{store.path} holds activations of {store.manifest['model']!r}")
        if hook not in store.hooks:
            raise StoreMismatch(f"{self.name} was fitted on {hook!r}; the store at {store.path} holds {store.hooks}")
        if store.d_model != self.d_in:
            raise StoreMismatch(f"{self.name} has d_in={self.d_in}, the store's d_model is {store.d_model}")
        return hook

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, features={self.n_features}, hook={self.hook_name!r})"


class SAEDictionary(Dictionary):
    """A trained SAE (a one-SAE helpers.saes.stack.SAEStack) as a Dictionary."""

    def __init__(self, sae, name: str | None = None):
        if sae.n != 1:
            raise ValueError("wrap one SAE at a time (stack[i])")
        self.sae = sae
        cfg = sae.configs[0]
        self.name = name or f"SAE ({cfg.label})"
        self.hook_name, self.model_name = cfg.hook_name, cfg.model_name

    @property
    def directions(self) -> torch.Tensor:
        return self.sae.directions()[0]

    @property
    def device(self) -> torch.device:
        return self.sae.b_dec.device

    def encode(self, x):  # differentiable: callers that need no gradient run under no_grad
        self.check(x)
        return self.sae.encode(x.to(self.sae.b_dec.device).float())[0]

    @torch.no_grad()
    def decode(self, codes):
        return self.sae.decode(codes.unsqueeze(0).to(self.device).float())[0]

    @property
    def decoder_rows(self):
        return (self.sae.W_dec[0] / self.sae.scale[0]).detach().float()

    def to(self, device):
        self.sae.to(device)
        return self

    def save(self, path, extra: dict | None = None):
        """Save the SAE as SAELens files in the folder `path` (see helpers.saes.stack.save_saelens)."""

        return save_saelens(self.sae, path, extra=extra)


class ModuleDictionary(Dictionary):
    """Any SAE object with `encode` [N, d_in] -> [N, d_sae] and `decode` back, as a Dictionary: a
    SAELens ``SAE`` (read by its attributes: ``W_dec``, ``b_dec``, ``cfg``; sae_lens is never imported),
    an SAE of EleutherAI's sparsify, or a reader's own module. Directions are the rows of ``W_dec`` (or
    ``decoder.weight``ᵀ), normalised."""

    def __init__(self, sae, name: str | None = None, hook_name: str = "", model_name: str = ""):
        for attr in ("encode", "decode"):
            if not callable(getattr(sae, attr, None)):
                raise TypeError(f"{type(sae).__name__} has no {attr}(): an SAE needs encode and decode")
        self.sae = sae
        self.name = name or type(sae).__name__
        cfg = getattr(sae, "cfg", None)
        meta = getattr(cfg, "metadata", None)
        self.hook_name = hook_name or getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", "") or ""
        self.model_name = model_name or getattr(meta, "model_name", None) or getattr(cfg, "model_name", "") or ""

    @property
    def decoder_rows(self) -> torch.Tensor:
        w = getattr(self.sae, "W_dec", None)
        if w is None and hasattr(getattr(self.sae, "decoder", None), "weight"):
            w = self.sae.decoder.weight.T
        if w is None:
            raise NotImplementedError(f"{self.name} has no W_dec: its decoder is not known to be linear")
        return w.detach().float()

    @property
    def directions(self) -> torch.Tensor:
        w = self.decoder_rows
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @property
    def device(self) -> torch.device:
        return device_of(self.sae)

    @property
    def d_in(self) -> int | None:
        """The input width: ``cfg.d_in``, else the decoder's; None when neither is known."""
        d = getattr(getattr(self.sae, "cfg", None), "d_in", None)
        if d is None:
            try:
                d = self.decoder_rows.shape[1]
            except NotImplementedError:
                return None
        return int(d)

    def check(self, x: torch.Tensor) -> None:
        if self.d_in is not None:
            super().check(x)

    def encode(self, x):  # differentiable, as the SAE's own encode
        self.check(x)
        return self.sae.encode(x.to(self.device).float()).float()

    @torch.no_grad()
    def decode(self, codes):
        return self.sae.decode(codes.to(self.device).float()).float()

    def to(self, device):
        self.sae.to(device)
        return self


def as_dictionary(sae, name: str | None = None) -> Dictionary:
    """`sae` as a Dictionary: a Dictionary as it is; a one-SAE workbook stack as `SAEDictionary`; any
    other object with encode/decode (a SAELens ``SAE``, a sparsify SAE, a reader's module) as
    `ModuleDictionary`. Everything that takes a dictionary takes it through this."""
    if isinstance(sae, Dictionary):
        return sae

    if isinstance(sae, SAEStack):
        return SAEDictionary(sae, name)
    return ModuleDictionary(sae, name)


def load_sae(path, name: str | None = None) -> SAEDictionary:
    """The SAE in the SAELens-layout folder `path` (ours, or a SAELens standard, topk or jumprelu SAE)
    as a Dictionary: ``encode(x [N, d_in]) -> [N, d_sae]``, ``decode``, ``directions``, ``save``."""

    return SAEDictionary(load_saelens(path), name)


class LinearDictionary(Dictionary):
    """Signed linear codes s = (x - mean) @ encoder, split into positive and negative halves.

    `encoder` [d_in, k] gives the codes, `decoder` [k, d_in] rebuilds x = mean + s @ decoder
    (for an orthonormal basis, decoder = encoderᵀ). Features 0..k-1 are the positive halves,
    k..2k-1 the negative ones.
    """

    def __init__(self, encoder: torch.Tensor, decoder: torch.Tensor, mean: torch.Tensor | None = None,
                 name: str = "linear", hook_name: str = "", model_name: str = "", massive=None):
        self.encoder = encoder.float()
        self.decoder = decoder.float()
        self.mean = torch.zeros(encoder.shape[0]) if mean is None else mean.float()
        self.name, self.hook_name, self.model_name = name, hook_name, model_name
        self.massive = massive  # helpers.activations.massive.Massive, or None
        d = self.decoder / self.decoder.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self._directions = torch.cat([d, -d])

    @property
    def directions(self) -> torch.Tensor:
        return self._directions

    def to(self, device):
        for name in ("encoder", "decoder", "mean", "_directions"):   # a massive rule follows its input
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def n_signed(self) -> int:
        return self.encoder.shape[1]

    def signed_codes(self, x):  # differentiable, as encode
        self.check(x)
        x = x.float() if self.massive is None else self.massive.shift(x.float())
        return (x - self.mean.to(x.device)) @ self.encoder.to(x.device)

    def encode(self, x):
        s = self.signed_codes(x)
        return torch.cat([torch.relu(s), torch.relu(-s)], dim=-1)

    @property
    def decoder_rows(self):
        return torch.cat([self.decoder, -self.decoder])

    @torch.no_grad()
    def decode(self, codes):
        """The activation the codes stand for (with any massive offset removed, as encode saw it)."""
        k = self.n_signed
        s = codes[..., :k] - codes[..., k:]
        return self.mean.to(codes.device) + s @ self.decoder.to(codes.device)


RANDOM_STREAM = 0x52414E44  # mixed into the seed of random directions: never an SAE's initialisation


def random_directions(d_in: int, n_features: int, mean: torch.Tensor | None = None, seed: int = 0,
                      hook_name: str = "", model_name: str = "", massive=None):
    """n_features/2 random unit directions (each split in two halves) around the data mean: the
    chance baseline. They come from their own random stream (`seed` mixed with RANDOM_STREAM), so
    they are independent of any SAE initialised with the same seed, and they have a decoder that
    reconstructs: an orthonormal set when there are at most d_in of them (decoder = encoderᵀ), else
    the pseudo-inverse of the encoder (d_in directions or more span the space, and
    decode(encode(x)) = x; the transpose would move an activation by about n/d_in times too much)."""

    own = int(np.random.SeedSequence([seed, RANDOM_STREAM]).generate_state(1)[0])
    g = torch.Generator().manual_seed(own)
    n = max(1, n_features // 2)
    w = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if n <= d_in:
        w = torch.linalg.qr(w.T).Q.T                      # orthonormal rows
        dec = w
    else:
        w = w / w.norm(dim=-1, keepdim=True)
        dec = torch.linalg.pinv(w.T)                      # [n, d_in]: (x w^T) dec = x
    return LinearDictionary(w.T.float(), dec.float(), mean, name="random directions", hook_name=hook_name,
                            model_name=model_name, massive=massive)


def neuron_basis(d_in: int, mean: torch.Tensor | None = None, hook_name: str = "", model_name: str = "",
                 massive=None):
    """The standard basis around the data mean: each residual-stream dimension (a "neuron") and
    its negative."""
    eye = torch.eye(d_in)
    return LinearDictionary(eye, eye, mean, name="neuron basis", hook_name=hook_name, model_name=model_name,
                            massive=massive)
