"""The figures the notebooks show (matplotlib). Each function takes data, returns its Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from helpers.activations.corpus import COARSE_TAGS, NO_TAG, coarse_tag
from helpers.evals.features import ConceptSummary
from helpers.runs.sweep import PAPER_FAMILY, as_row, family_groups
from helpers.saes import architectures


def norms_by_hook(store, max_tokens: int = 20_000):
    """Box plot of per-token L2 norms, one box per hook (e.g. per layer)."""
    norms = [store.activations(h, max_tokens).norm(dim=-1).numpy() for h in store.hooks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(norms), 3.6))
    ax.boxplot(norms, showfliers=False)
    ax.set_xticks(range(1, len(norms) + 1), [h.replace(".hook_", "\n") for h in store.hooks], fontsize=8)
    ax.set_ylabel("‖activation‖₂ per token")
    ax.set_title("Residual-stream norm by layer")
    fig.tight_layout()
    return fig


def value_histogram(x: torch.Tensor, title: str = "All activation values"):
    """Histogram of every entry of x (log counts), with the share of mass in the tails."""
    v = x.flatten().float().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(v, bins=200, log=True, color="tab:blue")
    lo, hi = np.percentile(v, [0.1, 99.9])
    ax.axvline(lo, color="grey", ls=":"), ax.axvline(hi, color="grey", ls=":")
    ax.set_xlabel("activation value (dotted: 0.1% and 99.9% quantiles)")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dimension_distributions(x: torch.Tensor, dims, title: str = "Single dimensions"):
    """Small multiples: the distribution of a few chosen dimensions of x [n_tokens, d_model]."""
    dims = list(dims)
    cols = min(4, len(dims))
    rows = int(np.ceil(len(dims) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.3 * rows), squeeze=False)
    for ax, d in zip(axes.flat, dims):
        ax.hist(x[:, d].float().numpy(), bins=80, color="tab:orange")
        ax.set_title(f"dim {d}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def label_counts(tokens, tags: list[str] | None = None, genres: list[str] | None = None):
    """Bar charts of the harvested tokens' coarse POS tags and genres: `tokens` is a store (its labels,
    tags and genres) or its label records with the tag and genre names."""
    if hasattr(tokens, "manifest"):
        tags = tokens.manifest["tags"] if tags is None else tags
        genres = tokens.manifest["genres"] if genres is None else genres
        tokens = tokens.tokens()
    coarse = np.array([COARSE_TAGS.index(coarse_tag(t)) for t in tags] + [len(COARSE_TAGS)] * (256 - len(tags)))
    pos = np.where(tokens["pos"] == NO_TAG, len(COARSE_TAGS), coarse[tokens["pos"]])
    pos_counts = np.bincount(pos, minlength=len(COARSE_TAGS) + 1)
    genre_counts = np.bincount(tokens["genre"], minlength=len(genres))[:len(genres)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    a.bar(COARSE_TAGS + ["none"], pos_counts, color="tab:green")
    a.set_title("Tokens by part of speech (their word's tag)")
    a.tick_params(axis="x", labelrotation=45, labelsize=8)
    b.bar(genres, genre_counts, color="tab:purple")
    b.set_title("Tokens by genre")
    b.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.tight_layout()
    return fig


def massive_norms(store, rules, max_tokens: int = 100_000):
    """Per hook, a histogram of token norms (log scale) with the massive-activation threshold, and
    the share of tokens and of variance beyond it; `rules` is {hook: Massive} or a MassiveReport."""
    rules = getattr(rules, "rules", rules)
    hooks = list(rules)
    fig, axes = plt.subplots(1, len(hooks), figsize=(4.2 * len(hooks), 3.2), squeeze=False)
    for ax, h in zip(axes[0], hooks):
        n = store.activations(h, max_tokens).norm(dim=-1).numpy()
        r = rules[h]
        ax.hist(n, bins=np.geomspace(max(n.min(), 1e-3), n.max() * 1.01, 80), log=True, color="tab:blue")
        ax.set_xscale("log")
        ax.axvline(r.threshold, color="tab:red", ls="--", lw=1)
        ax.set_title(f"{h.replace('.hook_', ' ')}\n{r.share:.1%} of tokens massive, {r.variance_share:.0%} of variance",
                     fontsize=9)
        ax.set_xlabel("‖activation‖₂ (red: 4 × median)")
    axes[0, 0].set_ylabel("tokens (log)")
    fig.tight_layout()
    return fig


# ---- notebook 02: the SAE sweep ----------------------------------------------------------------
FAMILY_STYLE = {"Anthropic-2023 L1": dict(marker="o", color="tab:blue"), "improved L1": dict(marker="s", color="tab:green"),
                "TopK": dict(marker="*", ms=11, color="black"), "BatchTopK": dict(marker="^", ms=8, color="tab:purple"),
                "Matryoshka BatchTopK": dict(marker="v", ms=8, color="tab:brown"),
                "JumpReLU": dict(marker="D", ms=7, color="tab:orange"),
                "improved L1 (no massive treatment)": dict(marker="x", ms=9, color="tab:red")}


def _paper_groups(rows):
    return {(tied, ratio): rs for (fam, ratio, tied), rs in family_groups(rows).items() if fam == PAPER_FAMILY}


def sweep_frontier(rows, pca=None):
    """Sparsity against reconstruction, over all tokens (left) and over ordinary tokens (right): L0
    vs held-out FVU, a line per family and size (over α or k), and PCA keeping as many components
    as the L0 (dashed; `pca`: helpers.evals.reconstruction.pca_fvu's PCAFVU). `rows`: a Sweep, or
    its rows."""
    rows = [as_row(r) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for ax, key, title in ((axes[0], "fvu", "all tokens"), (axes[1], "fvu_ordinary", "ordinary tokens")):
        for (fam, ratio, tied), rs in family_groups(rows).items():
            style = dict(FAMILY_STYLE.get(fam, {}))
            if fam == PAPER_FAMILY and len({r.ratio for r in rows if r.family == fam}) > 1:
                style.pop("color", None)
            ax.plot([r.l0 for r in rs], [getattr(r, key) for r in rs], "-", lw=1, alpha=0.8,
                    label=f"{fam} R={ratio:g}{' tied' if tied else ''}", **style)
        if pca:
            vals = pca.all if key == "fvu" else pca.ordinary
            ks = sorted(vals)
            ax.plot(ks, [vals[k] for k in ks], "k--", lw=1, label="PCA, L0 = #components")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(f"FVU (held-out, {title})")
        ax.set_title(f"Sparsity vs reconstruction, {title}: lower-left is better", fontsize=10)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_panels(sweep):
    """Three panels of a Sweep: dead latents vs α, MMCS vs R (anthropic2023 SAEs: trained, solid; the
    same pairs at initialisation, dotted; random dictionaries of the same sizes, grey dashed), CE-loss
    recovered vs L0 (all families)."""
    rows, mmcs_rows = list(sweep.rows_), sweep.mmcs
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    for (fam, ratio, tied), rs in family_groups(rows).items():
        lab = f"{fam} R={ratio:g}{' tied' if tied else ''}"
        style = dict(FAMILY_STYLE.get(fam, {}))
        if fam == PAPER_FAMILY and len({r.ratio for r in rows if r.family == fam}) > 1:
            style.pop("color", None)
        if architectures.get(rs[0].architecture).l1:
            a.plot([r.l1_coefficient for r in rs], [100 * r.dead for r in rs], "-", label=lab, **style)
        c.plot([r.l0 for r in rs], [100 * r.ce_recovered_mean for r in rs], "-", label=lab, **style)
    a.set_xscale("log"), a.set_xlabel("α (L1 coefficient)"), a.set_ylabel("dead latents (%)")
    a.set_title("Dead latents vs α"), a.legend(fontsize=7)
    by_alpha = {}
    for m in mmcs_rows:
        by_alpha.setdefault((m.alpha, m.tied), []).append(m)
    for (alpha, tied), ms in sorted(by_alpha.items()):
        ms = sorted(ms, key=lambda m: m.ratio_small)
        line, = b.plot([m.ratio_small for m in ms], [m.mmcs for m in ms], "o-",
                       label=f"α={alpha:g}{' tied' if tied else ''}, trained")
        if all(m.mmcs_init is not None for m in ms):
            b.plot([m.ratio_small for m in ms], [m.mmcs_init for m in ms], ":", marker=".",
                   color=line.get_color(), label=f"α={alpha:g}{' tied' if tied else ''}, at initialisation")
    chance = sorted({(m.ratio_small, m.mmcs_random) for m in mmcs_rows if m.mmcs_random is not None})
    if chance:
        b.plot([r for r, _ in chance], [v for _, v in chance], "--", color="grey", label="random dictionaries")
    b.set_xscale("log", base=2), b.set_ylim(0, 1.02)
    b.set_xlabel("R of the smaller dictionary"), b.set_ylabel("MMCS with the next larger one")
    b.set_title("Do bigger dictionaries find the same features?"), b.legend(fontsize=7)
    c.set_xscale("log"), c.set_xlabel("L0"), c.set_ylabel("CE-loss recovered (%), mean-ablation ref.")
    c.set_title("Downstream loss with the SAE spliced in"), c.legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_curves(sweep):
    """MSE (scaled units) and L0 of every SAE of a Sweep over training (its `history`)."""
    history, labels = sweep.history, [r.label for r in sweep.rows_]
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6))
    for i, lab in enumerate(labels):
        a.plot(steps, [h["mse"][i] for h in history], lw=1, label=lab)
        b.plot(steps, [h["l0"][i] for h in history], lw=1, label=lab)
    a.set_yscale("log"), a.set_xlabel("step"), a.set_ylabel("MSE / d_in (scaled)"), a.set_title("Reconstruction loss")
    b.set_yscale("log"), b.set_xlabel("step"), b.set_ylabel("L0"), b.set_title("Active latents per token")
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def learning_curves(sweep, highlight=None):
    """Held-out FVU (all and ordinary tokens) and CE-loss recovered (mean-ablation reference) against
    tokens seen, one line per SAE of a Sweep (its learning curve; `highlight`: SAE indices to draw
    bold, by default the chosen SAE and the TopK SAEs)."""
    highlight = set([sweep.chosen] + sweep.topk_indices() if highlight is None else highlight)
    tokens = sweep.curve_tokens
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, r in enumerate(sweep.rows_):
        style = dict(FAMILY_STYLE.get(r.family, {}))
        style.update(lw=2.5 if i in highlight else 0.8, alpha=1 if i in highlight else 0.6, ms=5)
        for ax, key in zip(axes, ("fvu", "fvu_ordinary", "ce_recovered_mean")):
            ys = sweep.curve_of(i, key)
            if all(y is not None for y in ys):
                ax.plot(tokens, [100 * y if key.startswith("ce") else y for y in ys], "-",
                        label=r.label if ax is axes[2] else None, **style)
    for ax, lab in zip(axes, ("FVU, all tokens", "FVU, ordinary tokens", "CE-loss recovered (%), mean-ablation ref.")):
        ax.set_xscale("log"), ax.set_xlabel("tokens seen"), ax.set_ylabel(lab + " (held-out)")
    axes[0].set_yscale("log"), axes[1].set_yscale("log")
    axes[1].set_title("Learning curves: flat at the right end = more tokens would not help", fontsize=10)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    return fig


# ---- notebook 03: features ---------------------------------------------------------------------
def density_histogram(stats_by_name: dict):
    """Log10 activation density of every feature, one histogram per dictionary."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, st in stats_by_name.items():
        d = st.density.clamp_min(1e-7).log10().numpy()
        ax.hist(d, bins=50, alpha=0.55, label=f"{name} ({int((st.density == 0).sum())} dead)")
    ax.set_xlabel("log10(activation density)  (dead features at -7)")
    ax.set_ylabel("features")
    ax.set_title("How often does each feature fire?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def concept_score_comparison(scores_by_name: dict, summaries=None, min_active: int = 5):
    """Per-feature best-concept MCC for each dictionary (box plots), medians with 95% CIs (`summaries`:
    {name: DictionaryScore} or a ConceptSummary; computed from the scores when not given)."""
    summaries = ConceptSummary.of(scores_by_name, min_active=min_active) if summaries is None else summaries
    names = list(scores_by_name)
    data = [s.mcc[s.active_counts >= min_active].numpy() for s in scores_by_name.values()]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.8))
    ax.boxplot(data, showfliers=False)
    for i, n in enumerate(names, 1):
        s = summaries[n]
        ax.errorbar(i, s.value, yerr=[[s.value - s.low], [s.high - s.value]], fmt="o",
                    color="tab:red", capsize=4)
    ax.set_xticks(range(1, len(names) + 1), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("best-concept MCC per feature")
    ax.set_title("Concept score (red: median, 95% bootstrap CI)")
    fig.tight_layout()
    return fig


def concept_families(scores, min_mcc: float = 0.3):
    """Which kind of concept the well-explained features (MCC >= min_mcc) line up with (`scores`: a ConceptScores)."""
    good = scores.mcc >= min_mcc
    fams = [c.split(" ")[0] for c, g in zip(scores.concept, good.tolist()) if g]
    kinds = ["token", "POS", "tag", "genre", "class"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(kinds, [fams.count(k) for k in kinds], color="tab:cyan")
    ax.set_title(f"{int(good.sum())} features with MCC ≥ {min_mcc}: their concept type", fontsize=9)
    fig.tight_layout()
    return fig


# ---- notebook 04: baselines --------------------------------------------------------------------
# ---- notebook 05: patching, editing, circuits ------------------------------------------------------
def patch_by_layer(by_layer):
    """Share of the IOI gap closed by patching the whole residual stream, by layer, at the changed
    positions and at the last position (helpers.causal.patching.PatchByLayer)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    layers = [r.layer for r in by_layer]
    ax.plot(layers, [r.gap_closed["changed"] for r in by_layer], "o-", label="at the changed position (the second name)")
    ax.plot(layers, [r.gap_closed["last"] for r in by_layer], "s-", label="at the last position (where the answer is read)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axhline(1, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("layer (residual stream after the block)")
    ax.set_ylabel("share of the logit-difference gap closed")
    ax.set_title("Where does the model keep the information that decides the answer?", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def circuit_graph(down: dict, ups: list[dict]):
    """A one-hop feature circuit: `down` = {"label", "description"}; `ups` = [{"label",
    "description", "change"}] upstream features, drawn left, with edges whose width is the measured
    change of the downstream feature when the upstream one is ablated (red: ablating lowers it)."""
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * max(len(ups), 1)))
    n = max(len(ups), 1)
    biggest = max([abs(u["change"]) for u in ups] + [1e-9])
    ys = np.linspace(0.9, 0.1, n) if n > 1 else np.array([0.5])
    box = dict(boxstyle="round", fc="#eef3fb", ec="#5577aa")
    for u, y in zip(ups, ys):
        colour = "#c0392b" if u["change"] < 0 else "#2471a3"
        ax.annotate("", xy=(0.64, 0.5), xytext=(0.36, y),
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=0.5 + 5 * abs(u["change"]) / biggest))
        ax.text(0.35, y, f"{u['label']}\n{u['description']}", ha="right", va="center", fontsize=7, bbox=box)
        ax.text(0.5, (y + 0.5) / 2 + 0.03, f"{u['change']:+.2f}", ha="center", fontsize=7, color=colour)
    ax.text(0.65, 0.5, f"{down['label']}\n{down['description']}", ha="left", va="center", fontsize=8,
            bbox=dict(boxstyle="round", fc="#fdf2e9", ec="#aa7755"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title("Feature circuit: ablating each upstream feature changes the downstream one by (edge label)",
                 fontsize=9)
    fig.tight_layout()
    return fig


# ---- notebooks 03 and 04: held-out, sparsity-matched concept scores (helpers.evals.heldout) ---------------
def _per_feature(results) -> list:
    """Held-out results as per-feature `Scored`s: a HeldoutComparison's scores, HeldoutScores, or Scoreds."""
    results = list(results.scores.values()) if hasattr(results, "scores") else list(results)
    return [r.scored_features() if hasattr(r, "scored_features") else r for r in results]


def _count_bins(counts, edges):
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if ((counts >= lo) & (counts < hi)).any()]


def chance_by_sparsity(results, edges=(5, 10, 20, 40, 80, 160, 320, 640, 1280, 10**9)):
    """The pitfall and its fix: median best-concept MCC by active count, chosen and read on the same
    tokens (in-sample) and held out, for each scored dictionary and for its null (its own active
    counts on shuffled contexts: chance at that sparsity)."""
    results = _per_feature(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (title, real, null) in zip(axes, [("in-sample (chosen and scored on the same tokens)", "in_sample_mcc",
                                               "null_in_sample_mcc"), ("held out (chosen on one half, scored on the other)",
                                                                      "mcc", "null_mcc")]):
        for i, r in enumerate(results):
            c = np.asarray(r.counts)
            bins = _count_bins(np.where(r.scored, c, -1), edges)
            x = [np.sqrt(lo * min(hi, 2 * lo)) for lo, hi in bins]
            for key, style in ((real, "-o"), (null, ":x")):
                v = np.asarray(getattr(r, key))
                y = [np.median(v[r.scored & (c >= lo) & (c < hi)]) for lo, hi in bins]
                ax.plot(x, y, style, color=f"C{i}", label=f"{r.name}" + (" (null)" if key == null else ""))
        ax.set_xscale("log")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("active tokens per feature")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("median best-concept MCC")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def heldout_by_density(results, key: str = "mcc", edges=(5, 10, 20, 40, 80, 160, 320, 640, 1280, 10**9)):
    """Held-out score (solid) and its sparsity-matched null (dotted) by active count, one colour per
    method: interpretability and sparsity seen apart."""
    results = _per_feature(results)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(results):
        c = np.asarray(r.counts)
        bins = _count_bins(np.where(r.scored, c, -1), edges)
        x = [np.sqrt(lo * min(hi, 2 * lo)) for lo, hi in bins]
        for k, style in ((key, "-o"), (f"null_{key}", ":")):
            v = np.asarray(getattr(r, k))
            ax.plot(x, [np.median(v[r.scored & (c >= lo) & (c < hi)]) for lo, hi in bins], style, color=f"C{i}",
                    label=r.name if k == key else None)
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("active tokens per feature")
    ax.set_ylabel(f"median held-out {'MCC' if key == 'mcc' else 'correlation'}")
    ax.set_title("Held-out score by sparsity (dotted: chance at the same sparsity)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heldout_by_layer(comparison):
    """The paper's Figure 2 layout, made fair: held-out concept score by layer, one line per method,
    95% intervals over resampled contexts; the excess over chance at the same sparsity beside it.
    `comparison`: helpers.dictionaries.baselines.compare_layers' LayerComparison (or its MethodScores)."""
    scores = list(getattr(comparison, "scores", comparison))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    methods = list(dict.fromkeys(s.method for s in scores))
    for ax, (key, label) in zip(axes, [("mcc", "median held-out MCC"), ("excess_mcc", "median excess MCC over chance"),
                                       ("corr", "median held-out correlation")]):
        for i, m in enumerate(methods):
            est = [getattr(s, key) for s in sorted([s for s in scores if s.method == m], key=lambda s: s.layer)]
            x = np.array(sorted(s.layer for s in scores if s.method == m)) + (i - len(methods) / 2) * 0.06
            y = np.array([e.value for e in est])
            err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=m, lw=2 if "SAE" in m else 1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("layer (residual stream after the block)")
        ax.set_ylabel(label)
    axes[0].set_title("Held-out, sparsity-matched interpretability by layer (ordinary tokens)", fontsize=10)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def patch_curves_heldout(comparisons: dict):
    """comparisons: {layer: PatchComparison} (helpers.causal.patching: every dictionary's patch curve,
    ranked on one half of the prompts, measured on the other, with intervals). Per layer: the held-out
    share of the gap closed against k with its 95% interval (band) and the in-sample curve (features
    ranked on the measured prompts themselves, dotted); the KL divergence from the clean run; and, if
    the comparison has a contrast (e.g. patched at the last position), its held-out curve."""
    layers = list(comparisons)
    contrast = any(c.contrast for c in comparisons.values())
    cols = 3 if contrast else 2
    fig, axes = plt.subplots(len(layers), cols, figsize=(5 * cols, 3.4 * len(layers)), squeeze=False)
    for row, layer in enumerate(layers):
        comp = comparisons[layer]
        panels = [(axes[row, 0], comp.curves, "gap_closed", True), (axes[row, 1], comp.curves, "kl", False)]
        if contrast:
            panels.append((axes[row, 2], comp.contrast, "gap_closed", False))
        for ax, res_by_name, key, with_in_sample in panels:
            for i, (name, res) in enumerate(res_by_name.items()):
                colour = f"C{i}"
                pts = res.points
                ks = [p.k for p in pts]
                floor = 1e-6 if key == "kl" else -np.inf
                ests = [getattr(p, key) for p in pts]
                ax.plot(ks, [max(e.value, floor) for e in ests], marker="o", color=colour,
                        lw=2 if "SAE" in name else 1, label=name)
                ax.fill_between(ks, [max(e.low, floor) for e in ests],
                                [max(e.high, floor) for e in ests], color=colour, alpha=0.15)
                if with_in_sample and pts[0].gap_in_sample is not None:
                    ax.plot(ks, [p.gap_in_sample.value for p in pts], ls=":", color=colour, lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("features patched (k)")
            if key == "kl":
                ax.set_yscale("log")
        axes[row, 0].set_ylabel(f"layer {layer}: gap closed")
        axes[row, 1].set_ylabel("KL(clean ‖ patched)")
        if contrast:
            axes[row, 2].set_ylabel("gap closed")
    axes[0, 0].set_title("At the repeated name: held-out (band: 95% CI), in-sample (dotted)", fontsize=9)
    axes[0, 1].set_title("How much the whole next-token distribution changes", fontsize=9)
    if contrast:
        axes[0, 2].set_title("Contrast: at the last position, held-out", fontsize=9)
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def edit_tradeoff_heldout(edits):
    """edits: an EditComparison (helpers.causal.patching; or {dictionary name: EditCurve}). Held-out
    edit against collateral damage, with 95% intervals on both (prompts; text sequences), k marked;
    hollow markers: k random features of the same dictionary."""
    curves = getattr(edits, "curves", edits)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, res) in enumerate(curves.items()):
        pts, colour = res.points, f"C{i}"
        ce, ed = [p.ce_increase for p in pts], [p.edit for p in pts]
        x, y = [e.value for e in ce], [e.value for e in ed]
        ax.errorbar(x, y, xerr=[[e.value - e.low for e in ce], [e.high - e.value for e in ce]],
                    yerr=[[e.value - e.low for e in ed], [e.high - e.value for e in ed]],
                    marker="o", color=colour, lw=2 if "SAE" in name else 1, capsize=2, label=name)
        for p, xi, yi in zip(pts, x, y):
            ax.annotate(str(p.k), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if pts[0].edit_random is not None and pts[0].ce_random is not None:
            ax.plot([p.ce_random.value for p in pts], [p.edit_random.value for p in pts], ls=":", marker="o",
                    mfc="none", color=colour, lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("collateral damage: CE-loss increase on held-out text (nats/token)")
    ax.set_ylabel("held-out edit: share of the logit difference removed")
    ax.set_title("Removing a behaviour by ablating k features (hollow: k random features)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def interpretability_curve(curve):
    """Held-out MCC of the SAE and of random directions at its sparsity, against training tokens
    (`curve`: an InterpretabilityCurve)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    t = [p.tokens for p in curve.points]
    for key, label in (("sae", "SAE"), ("random", "random directions at the SAE's sparsity")):
        est = [getattr(p, key) for p in curve.points]
        y = np.array([e.value for e in est])
        err = np.array([[e.value - e.low for e in est], [e.high - e.value for e in est]])
        ax.errorbar(t, y, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("median held-out MCC (ordinary tokens)")
    ax.set_title("Does interpretability grow with training?", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def groundtruth_scores(rows, keys=(("mmcs", "MMCS (directions)"), ("mcc", "matched MCC (activations)"),
                                   ("recall", "recall of the matched latent"))):
    """The ground-truth lab (helpers.saes.groundtruth.run_lab): per setting, one bar per family (its config
    nearest the true L0) and the untrained reference, for each score (with its 95% interval over the true
    features where the rows carry one: the matched MCC). `rows`: a groundtruth.Lab, or its rows."""
    rows = [r.to_dict() if hasattr(r, "to_dict") else r for r in rows]
    keep = [r for r in rows if r.get("nearest_l0") in (True, None)]
    settings = list(dict.fromkeys(r["setting"] for r in keep))
    families = list(dict.fromkeys(r["family"] for r in keep))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharey=True)
    width = 0.8 / len(families)
    for ax, (key, label) in zip(np.atleast_1d(axes), keys):
        for j, fam in enumerate(families):
            rs = [next((r for r in keep if r["setting"] == s and r["family"] == fam), {}) for s in settings]
            ys = np.array([r.get(key, np.nan) for r in rs])
            err = None
            if all(r.get(f"{key}_low") is not None for r in rs):  # a 95% interval over the true features, where the rows have one
                err = np.clip([[y - r[f"{key}_low"] for y, r in zip(ys, rs)],
                               [r[f"{key}_high"] - y for y, r in zip(ys, rs)]], 0, None)
            ax.bar(np.arange(len(settings)) + (j - (len(families) - 1) / 2) * width, ys, width, label=fam,
                   yerr=err, capsize=2, color="lightgrey" if fam.startswith("untrained") else None)
        ax.set_xticks(np.arange(len(settings)), settings)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("score against the true features")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def steering_comparison(result):
    """helpers.causal.steering.SteeringComparison: per concept, the share of continuations showing the
    concept (95% interval over prompts) against the measured KL cost on held-out text, one line per
    method from the unsteered point through its KL targets."""
    rows = result.measured
    concepts = list(dict.fromkeys(r.concept for r in rows))
    fig, axes = plt.subplots(1, max(len(concepts), 1), figsize=(4.2 * max(len(concepts), 1), 3.6), sharey=True,
                             squeeze=False)
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m != "unsteered"]
    for ax, name in zip(axes[0], concepts):
        base = next(r.share for r in rows if r.concept == name and r.method == "unsteered")
        ax.errorbar([0], [base.value], yerr=[[base.value - base.low], [base.high - base.value]],
                    fmt="s", color="grey", capsize=2, label="unsteered")
        for i, m in enumerate(methods):
            pts = sorted((r for r in rows if r.concept == name and r.method == m), key=lambda r: r.target_kl)
            if not pts:
                continue
            x = [0.0] + [r.kl for r in pts]
            y = [base.value] + [r.share.value for r in pts]
            ax.plot(x, y, color=f"C{i}", lw=1, alpha=0.6)
            ax.errorbar([r.kl for r in pts], [r.share.value for r in pts],
                        yerr=[[r.share.value - r.share.low for r in pts], [r.share.high - r.share.value for r in pts]],
                        fmt="o" if m.startswith("SAE") else "D", color=f"C{i}", capsize=2, label=m)
        ax.set_title(f"{name}", fontsize=10)
        ax.set_xlabel("KL from unsteered (nats/token)", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("share of continuations showing the concept")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Steering at matched cost (KL on held-out text): SAE feature vs difference of means", fontsize=10)
    fig.tight_layout()
    return fig


def toy_superposition(sweep):
    """Elhage et al.'s toy model at several sparsities (helpers.saes.toy.SuperpositionSweep): top row,
    each feature's direction (a column of W) as an arrow in the d = 2 plane, faded when the feature
    is not represented; bottom row, the interference WᵀW (diagonal: the squared norms)."""
    models = list(sweep.models)
    fig, axes = plt.subplots(2, len(models), figsize=(2.6 * len(models), 5.4), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.9, models[0].n_features)) if models else []
    for j, m in enumerate(models):
        ax = axes[0][j]
        W = np.asarray(m.W)
        for i in range(m.n_features):
            on = bool(m.represented[i])
            ax.annotate("", xy=(W[0, i], W[1, i]) if m.d > 1 else (W[0, i], 0), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="->", color=colors[i], lw=2 if on else 1, alpha=1 if on else 0.3))
        lim = max(1.2, float(np.abs(W).max()) * 1.15)
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="0.85", lw=0.8))
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"sparsity {m.sparsity:g}\n{m.n_represented} of {m.n_features} in {m.d} dims", fontsize=9)
        gram = W.T @ W
        lim2 = max(1.0, float(np.abs(gram).max()))
        im = axes[1][j].imshow(gram, cmap="RdBu_r", vmin=-lim2, vmax=lim2)
        axes[1][j].set_xticks(range(m.n_features)), axes[1][j].set_yticks(range(m.n_features))
        axes[1][j].tick_params(labelsize=7)
        axes[1][j].set_title("WᵀW", fontsize=9)
    if models:
        fig.colorbar(im, ax=list(axes[1]), shrink=0.8, label="interference (off-diagonal)")
    fig.suptitle("Toy model of superposition (Elhage et al. 2022): features' directions, then WᵀW", fontsize=10)
    return fig
