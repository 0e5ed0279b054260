"""The profile's SAE sweep, end to end: its grid, training, evaluation, and the SAE it picks.

`get_sweep(profile)` trains the grid (``sae_ratios`` × ``sae_alphas`` × ``sae_tied`` paper SAEs,
plus TopK SAEs with ``topk_ks`` at ``topk_ratio``) in one pass (helpers.train), evaluates every SAE
on held-out activations and inside the model (helpers.metrics), saves each in SAELens layout and
the table in ``results.json``, and returns the table. A finished sweep is loaded, not retrained;
an interrupted one resumes from its checkpoint. `get_sae(profile)` returns the chosen SAE.

The choice, as a rule: among the paper's SAEs (ReLU + L1) of the profile's ``pick_ratio`` with at
most 20% dead latents and an L0 of at most 10% of d_in, the one with the highest CE-loss
recovered; if none qualifies, the one of that ratio with the lowest FVU (among those with at most
20% dead latents, if any).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .harvest import get_store
from .metrics import contexts_from_store, mmcs, reconstruction_metrics, spliced_loss
from .sae import SAEConfig, load_saelens, save_saelens
from .train import TrainConfig, train_sweep

MAX_DEAD = 0.2
MAX_L0_SHARE = 0.1


def sweep_configs(profile, d_in: int) -> list[SAEConfig]:
    common = {"hook_name": profile.sae_hook, "model_name": profile.model}
    configs = [SAEConfig.from_ratio(d_in, r, l1_coefficient=a, tied=t, **common)
               for t in profile.sae_tied for r in profile.sae_ratios for a in profile.sae_alphas]
    configs += [SAEConfig.from_ratio(d_in, profile.topk_ratio, architecture="topk", k=k, **common)
                for k in profile.topk_ks]
    return configs


def train_config(profile) -> TrainConfig:
    steps = profile.train_tokens // profile.train_batch
    return TrainConfig(total_tokens=profile.train_tokens, batch_size=profile.train_batch, lr=profile.lr,
                       warmup_steps=max(1, steps // 20), dead_window=min(profile.train_tokens // 4, 1_000_000),
                       resample_every=max(1, steps // 5), resample_until=0.7, log_every=max(1, steps // 100),
                       checkpoint_every=max(1, steps // 10), seed=profile.seed, device=profile.device)


def sweep_dir(profile) -> Path:
    key = json.dumps([profile.model, profile.corpus, profile.ctx_len, profile.harvest_tokens, profile.sae_hook,
                      profile.pick_ratio, profile.eval_tokens, profile.ce_contexts,
                      profile.sae_ratios, profile.sae_alphas, profile.sae_tied, profile.topk_ks,
                      profile.topk_ratio, profile.train_tokens, profile.train_batch, profile.lr, profile.seed])
    return profile.cache_dir / "sae" / f"sweep-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def choose(rows: list[dict], d_in: int, ratio: float) -> int:
    """Index of the chosen SAE in the sweep table (the rule in this module's docstring)."""
    paper = [i for i, r in enumerate(rows) if r["architecture"] == "standard" and r["ratio"] == ratio]
    if not paper:
        raise ValueError(f"the sweep has no paper SAE of ratio {ratio}")
    ok = [i for i in paper if rows[i]["dead"] <= MAX_DEAD and rows[i]["l0"] <= MAX_L0_SHARE * d_in]
    if ok:
        return max(ok, key=lambda i: rows[i]["ce_recovered"])
    alive = [i for i in paper if rows[i]["dead"] <= MAX_DEAD] or paper
    return min(alive, key=lambda i: rows[i]["fvu"])


@torch.no_grad()
def evaluate(saes, configs, eval_store, hook, model, ce_contexts: int) -> list[dict]:
    """One table row per SAE: config, L0/MSE/FVU/dead/dense on held-out activations, CE and KL."""
    x = eval_store.activations(hook)
    device = next(model.parameters()).device
    tokens = contexts_from_store(eval_store, ce_contexts, model.tokenizer.bos_token_id)
    saes = [s.to(device) for s in saes]

    def reconstruct(a):
        return torch.stack([s(a.to(device))[0] for s in saes])

    spliced = spliced_loss(model, tokens, hook, reconstruct, mean_act=x.mean(0))
    rows = []
    for j, (sae, cfg) in enumerate(zip(saes, configs)):
        r = reconstruction_metrics(sae, x)[0]
        rows.append({**dataclasses.asdict(cfg), "ratio": cfg.ratio, "label": cfg.label, **r,
                     "ce_sae": spliced["ce_sae"][j], "kl": spliced["kl_sae"][j],
                     "ce_recovered": spliced["ce_recovered"][j], "ce_recovered_mean": spliced["ce_recovered_mean"][j]})
    refs = {k: spliced[k] for k in ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean")}
    for r in rows:
        r.update(refs)
    return rows


def mmcs_table(saes, configs) -> list[dict]:
    """MMCS between each pair of paper SAEs with the same α and decoder, of successive sizes."""
    out = []
    paper = [(c, s) for c, s in zip(configs, saes) if c.architecture == "standard"]
    for ca, sa in paper:
        larger = sorted([(cb, sb) for cb, sb in paper if cb.l1_coefficient == ca.l1_coefficient
                         and cb.tied == ca.tied and cb.d_sae > ca.d_sae], key=lambda p: p[0].d_sae)
        if larger:
            cb, sb = larger[0]
            out.append({"alpha": ca.l1_coefficient, "tied": ca.tied, "ratio_small": ca.ratio,
                        "ratio_large": cb.ratio, "mmcs": mmcs(sa.directions()[0].cpu(), sb.directions()[0].cpu())})
    return out


def get_eval_store(profile, model=None, progress: bool = True):
    """Held-out activations: the profile's hooks on the corpus's test split (eval_tokens of them)."""
    return get_store(profile.replace(harvest_tokens=profile.eval_tokens), model=model, split="test",
                     progress=progress)


def get_sweep(profile, store=None, model=None, progress: bool = True) -> dict:
    """The profile's sweep results (training and evaluating first if needed).

    Returns {"rows": table, "mmcs": table, "history": training log, "chosen": index,
    "dir": folder, "seconds": training time, "tokens": tokens per SAE}.
    """
    folder = sweep_dir(profile)
    results = folder / "results.json"
    if results.exists():
        return {**json.loads(results.read_text()), "dir": str(folder)}
    if model is None:
        from .models import load_model

        model = load_model(profile.model, device=profile.device)
    store = store or get_store(profile, model=model, progress=progress)
    hook = profile.sae_hook
    eval_store = get_eval_store(profile, model=model, progress=progress)
    configs = sweep_configs(profile, store.d_model)
    result = train_sweep(store, hook, configs, train_config(profile), run_dir=folder, progress=progress)
    rows = evaluate(result.saes, configs, eval_store, hook, model, profile.ce_contexts)
    for i, (sae, row) in enumerate(zip(result.saes, rows)):
        save_saelens(sae.cpu(), folder / f"sae_{i:02d}", extra={"eval": {k: row[k] for k in
                     ("l0", "fvu", "dead", "ce_recovered")}})
    out = {"rows": rows, "mmcs": mmcs_table(result.saes, configs), "history": result.history,
           "chosen": choose(rows, store.d_model, profile.pick_ratio), "seconds": result.seconds, "tokens": result.tokens}
    tmp = results.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(results)
    return {**out, "dir": str(folder)}


def matched_topk(sweep: dict) -> int | None:
    """Index of the sweep's TopK SAE whose L0 is closest to the chosen SAE's (None without TopK):
    the 'go beyond the paper' SAE, compared at about the same sparsity."""
    topk = [i for i, r in enumerate(sweep["rows"]) if r["architecture"] == "topk"]
    if not topk:
        return None
    l0 = sweep["rows"][sweep["chosen"]]["l0"]
    return min(topk, key=lambda i: abs(sweep["rows"][i]["l0"] - l0))


def load_sweep_sae(sweep: dict, i: int):
    return load_saelens(Path(sweep["dir"]) / f"sae_{i:02d}")


def get_sae(profile, progress: bool = True):
    """The SAE that the sweep's rule chose (running the sweep first if needed), as a one-SAE stack."""
    sweep = get_sweep(profile, progress=progress)
    return load_sweep_sae(sweep, sweep["chosen"])
