"""The resource plan: what a profile needs (disk, host RAM, GPU memory, time) against the machine at hand.

`plan(profile)` estimates, before any work, from the profile's sizes and the model's dimensions:

* disk: the activation stores (training, held-out, and the Brown scoring store of a Pile profile), the
  sweep's and the layer SAEs' files and their training checkpoints, and the baselines, all under the
  cache ($SAE_CACHE); the embedded model's dequantised weights. Checkpoints follow helpers.saes.train's
  policy: without $SAE_SCRATCH, one per run in the cache plus its temporary copy while it is replaced;
  with it, two copies per run in the cache, rewritten in place, and on the local scratch disk one
  working checkpoint per run plus the temporary of the one being saved (`Plan.scratch`);
* peak host RAM: the Python kernel with torch and transformers loaded, the model's weights (and the
  embedded model's, which notebook 03 explains with when the profile's model cannot chat), and the
  largest of the notebooks' in-memory phases (the store's shuffle buffer while training, the PCA and
  ICA fits, the activations the notebooks load);
* peak GPU memory: the model and, while training, every SAE's parameters, gradients and Adam state
  plus the largest stack's batch tensors (one stack's graph is alive at a time: helpers.saes.train);
* time per notebook: FLOP counts over a throughput for the device kind (rough estimates: the GPU
  figures have not yet been measured on a GPU), plus the steps that run on the CPU whatever the device
  (numpy, scipy and scikit-learn: held-out concept scores with their context resamples, the PCA and
  ICA fits, logit effects), at the CPU's rate.

`Machine.detect()` reads the machine (GPU and its memory, host RAM, free disk at the cache), and
`check(plan, machine)` refuses a plan that does not fit with a `PlanError` that names the profile
field to change. A `Plan` is a typed result: it shows as a table (one row per resource) and saves as
JSON; `Plan.table()` gives the same as text. Notebook 01 shows the plan and checks it first. The estimates are meant as upper
bounds: the simulated Colab run in the tests compares them with the measured peaks.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch

from helpers.activations.models import hub_revision
from helpers.results import Result
from helpers.activations.store import iter_batches_peak_bytes
from helpers.causal.steering import METHODS, comparison_settings
from helpers.dictionaries.baselines import IN_MEMORY_TOKENS
from helpers.runs.sweep import CURVE_POINTS, CurveSnapshots, sweep_configs, train_config
from helpers.saes.train import TrainConfig
from helpers.settings.paths import cache_on_drive, cache_root, scratch_root

GB = 1e9
KERNEL_BYTES = 1.2 * GB        # a Jupyter kernel with torch, transformers, transformer_lens, sklearn imported
# Dense-equivalent FLOP/s our code reaches, by device kind (CPU: measured on 2 cores, fp32; GPUs:
# estimates from their matmul peaks, not yet measured on a GPU).
THROUGHPUT = {"cpu": 0.15e12, "t4": 15e12, "l4": 40e12, "a100": 120e12, "h100": 300e12, "gpu": 30e12}
# Work of the steps that stay on the CPU on any machine, in FLOPs of an fp32 matmul that takes as long (so
# they are divided by THROUGHPUT["cpu"]). Measured on the workbook's 2-core machine as multiples of a
# torch fp32 matmul timed alongside each step (the machine's load cancels out), with d_model 512, Brown
# contexts of 256 tokens, dictionaries of 512-1024 features active on log-uniform numbers of tokens up
# to the scorer's cap, and scaled linearly in what each is written per:
HELDOUT_RESAMPLED = 2.5e4  # helpers.evals.heldout.HeldoutScorer.score with 200 context resamples, per scored token
                           # and feature (measured at 25k and 50k tokens: cost grew linearly with the tokens)
HELDOUT_PLAIN = 1.3e4      # the same score without resamples
ICA_PER_ITER = 35          # scikit-learn FastICA in float32, per token, iteration and d_model²
                           # (0.59 of its float64 time, at 8k tokens and 30 iterations)
ICA_WHITEN = 9e3           # its whitening and set-up, per d_model³ (the same at 5k and 10k tokens)
PCA_FIT = 140              # scikit-learn PCA (full SVD, float64), per token and d_model² (at 10k-50k tokens)
PCA_STREAMED = 5           # PCA streamed over a store too big for memory (float64 covariance), per token and
                           # d_model² (300k tokens at d_model 576)
LOGIT_EFFECTS = 4          # helpers.evals.features.logit_effects, per feature, d_model and vocabulary entry
VOCAB = 50_304             # vocabulary size for logit effects (Pythia's; SmolLM2's is 49,152)
KNOWN_MODELS = {  # name: (d_model, n_layers, parameters), for when the model's config is not at hand
    "smollm2-135m-instruct": (576, 30, 134.5e6),
    "EleutherAI/pythia-70m-deduped": (512, 6, 70.4e6),
}


class PlanError(RuntimeError):
    """The profile does not fit this machine; the message says which field to change."""


@dataclass
class Machine:
    kind: str                      # a THROUGHPUT key
    name: str
    host_bytes: float
    disk_free_bytes: float
    gpu_bytes: float = 0.0         # 0: no GPU
    scratch_free_bytes: float = 0.0  # free disk at $SAE_SCRATCH (0: unknown or unset)

    @classmethod
    def detect(cls) -> "Machine":
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        disk = shutil.disk_usage(cache_root()).free
        scratch = scratch_root()
        scratch_free = shutil.disk_usage(scratch).free if scratch is not None else 0.0
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            kind = next((k for k in ("t4", "l4", "a100", "h100") if k in name.lower()), "gpu")
            return cls(kind, name, pages, disk, torch.cuda.get_device_properties(0).total_memory, scratch_free)
        return cls("cpu", f"CPU, {os.cpu_count()} cores", pages, disk, scratch_free_bytes=scratch_free)

    @property
    def rate(self) -> float:
        return THROUGHPUT[self.kind]


@dataclass
class Plan(Result):
    """What a profile needs on one machine: bytes of disk (cache and scratch), host RAM and GPU memory
    by what uses them, and estimated seconds per notebook."""

    profile: str
    disk: dict = field(default_factory=dict)      # what: bytes
    host: dict = field(default_factory=dict)      # phase: bytes (the peak is the kernel + model + the largest)
    gpu: dict = field(default_factory=dict)       # phase: bytes
    seconds: dict = field(default_factory=dict)   # notebook: estimated seconds on the machine planned for
    machine: str = ""
    scratch: dict = field(default_factory=dict)   # what: bytes on the local scratch disk ($SAE_SCRATCH; empty: unset)

    @property
    def disk_bytes(self) -> float:
        return sum(self.disk.values())

    @property
    def scratch_bytes(self) -> float:
        return sum(self.scratch.values())

    @property
    def host_peak(self) -> float:
        fixed = self.host["kernel"] + self.host["model"]
        return fixed + max(v for k, v in self.host.items() if k not in ("kernel", "model"))

    @property
    def gpu_peak(self) -> float:
        return max(self.gpu.values()) if self.gpu else 0.0

    def rows(self) -> list[dict]:
        def gb(b):
            return f"{b / GB:.2f} GB"

        def parts(d, skip=()):
            return ", ".join(f"{k} {gb(v)}" for k, v in d.items() if k not in skip)
        out = [{"resource": "disk (cache)", "needs": gb(self.disk_bytes), "of which": parts(self.disk)}]
        if self.scratch:
            out.append({"resource": "local scratch ($SAE_SCRATCH)", "needs": gb(self.scratch_bytes),
                        "of which": parts(self.scratch)})
        out.append({"resource": "peak host RAM", "needs": gb(self.host_peak),
                    "of which": f"kernel {gb(self.host['kernel'])} + model {gb(self.host['model'])} + the largest "
                                f"phase: " + parts(self.host, ("kernel", "model"))})
        if self.gpu:
            out.append({"resource": "peak GPU memory", "needs": gb(self.gpu_peak), "of which": parts(self.gpu)})
        out.append({"resource": "time, estimated", "needs": _dur(sum(self.seconds.values())),
                    "of which": ", ".join(f"{k} {_dur(v)}" for k, v in self.seconds.items())})
        return out

    def verdicts(self) -> list[str]:
        return [f"resource plan for profile {self.profile!r} on {self.machine}: estimates meant as upper bounds "
                "(the times are rough)"]

    def table(self) -> str:
        """The plan as a few lines of text (what notebook 01 prints)."""
        def gb(b):
            return f"{b / GB:.2f} GB"
        lines = [f"resource plan for profile {self.profile!r} on {self.machine}:",
                 f"  disk (cache): {gb(self.disk_bytes)} = " + ", ".join(f"{k} {gb(v)}" for k, v in self.disk.items())]
        if self.scratch:
            lines.append(f"  local scratch ($SAE_SCRATCH): {gb(self.scratch_bytes)} = "
                         + ", ".join(f"{k} {gb(v)}" for k, v in self.scratch.items()))
        lines.append(f"  peak host RAM: {gb(self.host_peak)} (kernel {gb(self.host['kernel'])} + model "
                     f"{gb(self.host['model'])} + the largest phase: " + ", ".join(
                         f"{k} {gb(v)}" for k, v in self.host.items() if k not in ("kernel", "model")) + ")")
        if self.gpu:
            lines.append(f"  peak GPU memory: {gb(self.gpu_peak)} (" + ", ".join(f"{k} {gb(v)}" for k, v in self.gpu.items()) + ")")
        lines.append("  time, estimated: " + ", ".join(f"{k} {_dur(v)}" for k, v in self.seconds.items())
                     + f"; total {_dur(sum(self.seconds.values()))}")
        return "\n".join(lines)


def _dur(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def model_dims(name: str) -> tuple[int, int, float]:
    """(d_model, n_layers, parameters) of a model: from its config in the local hub cache (no network),
    else from KNOWN_MODELS."""
    if name != "smollm2-135m-instruct":
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name, revision=hub_revision(name), local_files_only=True)
            d, n, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
            inter = getattr(cfg, "intermediate_size", 4 * d)
            return d, n, float(n * (4 * d * d + 2 * d * inter) + 2 * v * d)
        except Exception:
            pass
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    raise PlanError(f"cannot read the dimensions of model {name!r} offline: load it once, or plan by hand")


def sae_parameters(c, d: int) -> int:
    """Parameters of one SAE of config `c` on d_model `d` (a tied SAE has no encoder matrix of its own)."""
    return (1 if c.tied else 2) * d * c.d_sae + c.d_sae + d


def checkpoint_bytes(configs, d: int) -> int:
    """A training checkpoint of these SAEs (helpers.saes.train): each parameter and its two Adam moments in
    fp32, and each latent's steps-since-fired counter (int64)."""
    return sum(3 * 4 * sae_parameters(c, d) + 8 * c.d_sae for c in configs)


def plan(profile, machine: Machine | None = None, scratch: bool | None = None) -> Plan:
    """The resources `profile` needs (see the module docstring), with times for `machine`; checkpoints
    as helpers.saes.train keeps them with a scratch folder or without (default: as $SAE_SCRATCH says)."""

    machine = machine or Machine.detect()
    d, n_layers, params = model_dims(profile.model)
    h, per_ctx = len(profile.layers), profile.ctx_len - 1
    row = d * 2 + 18                                   # bytes per token per hook (fp16/bf16) + labels
    p = Plan(profile.name, machine=machine.name)
    p.disk["training store"] = profile.harvest_tokens * h * row
    p.disk["held-out store"] = profile.eval_tokens * h * row
    scored = profile.scoring
    if scored is not profile:
        p.disk["Brown scoring store"] = scored.harvest_tokens * h * row
    configs = sweep_configs(profile, d)
    sae_params = [2 * d * c.d_sae + c.d_sae + d for c in configs]  # GPU memory below: untied, an upper bound
    widest = max(configs, key=lambda c: sae_parameters(c, d))
    keep = CurveSnapshots(configs, train_config(profile), profile.pick_ratio)  # what the sweep keeps for the curve
    layer_configs = [widest] * (2 * (h - 1))           # the chosen SAE and its TopK twin at every other layer
    p.disk["SAE files"] = 4 * sum(sae_parameters(c, d) for c in configs + layer_configs)
    runs = [checkpoint_bytes(configs, d)] + ([checkpoint_bytes(layer_configs, d)] if layer_configs else [])
    if scratch is None:
        scratch = bool(os.environ.get("SAE_SCRATCH"))
    if scratch:  # two copies per run in the cache; on scratch, each run's working copy and one save's temporary
        p.disk["checkpoint copies (2 a run)"] = 2 * sum(runs)
        p.scratch["working checkpoints"] = sum(runs)
        p.scratch["one being saved"] = max(runs)
    else:        # each run's checkpoint, and the temporary that replaces it while one is saved
        p.disk["checkpoints"] = sum(runs) + max(runs)
        if cache_on_drive():  # every replaced checkpoint goes to Drive's trash, which counts for 30 days
            tc = train_config(profile)
            steps = tc.total_tokens // tc.batch_size
            saves = steps // tc.checkpoint_every + (steps % tc.checkpoint_every > 0)
            p.disk["replaced checkpoints in Drive's trash"] = sum(runs) * (saves - 1)
    p.disk["baselines"] = h * 3 * d * d * 4
    chosen = max((configs[i] for i in keep.rows), key=lambda c: sae_parameters(c, d), default=widest)
    p.disk["the curve's snapshots"] = CURVE_POINTS * sae_parameters(chosen, d) * 4 if keep.on else 0
    embedded = KNOWN_MODELS["smollm2-135m-instruct"][2]
    p.disk["dequantised model"] = embedded * 4 + 10e6     # the embedded model (notebook 03's local explainer), tokenizer

    # Host RAM, per phase (bytes beyond the kernel and the model's weights).
    p.host["kernel"] = KERNEL_BYTES
    p.host["model"] = params * 4 + (embedded * 4 if profile.model != "smollm2-135m-instruct" else 0)
    # training: the shuffle buffer, and the sweep's CPU copies of each SAE the rule could choose at the
    # interpretability curve's first budgets (helpers.runs.sweep.CurveSnapshots)
    kept = (len(keep.budgets) - 1) * sum(sae_parameters(configs[i], d) for i in keep.rows) * 4 if keep.on else 0
    p.host["training (shuffle buffer, curve snapshots)"] = iter_batches_peak_bytes(
        h, d, profile.shard_contexts * per_ctx, TrainConfig.buffer_shards, profile.train_batch,
        store_dtype=profile.store_dtype) + kept
    streamed = profile.pca_tokens is None and profile.harvest_tokens > IN_MEMORY_TOKENS  # baselines.fit_pca's rule
    pca_n = profile.harvest_tokens if streamed else (profile.pca_tokens or profile.harvest_tokens)
    p.host["PCA fit"] = (d * d + 3 * 8192 * d) * 8 if streamed else 3 * pca_n * d * 8
    pca_fit = (PCA_STREAMED if streamed else PCA_FIT) * pca_n * d * d
    p.host["ICA fit"] = 4 * profile.ica_tokens * d * 8
    score_n = min(scored.harvest_tokens, profile.score_tokens or scored.harvest_tokens)
    p.host["loaded activations"] = (max(profile.eval_tokens, 50_000) + 2 * min(200_000, score_n)) * d * 4

    # GPU memory, if the machine has one.
    if machine.gpu_bytes:
        p.gpu["model"] = params * 4 + 2 * profile.batch_contexts * profile.ctx_len * d * 4 * n_layers
        states = sum(sae_params) * 4 * 4                   # parameter, gradient, two Adam moments (fp32)
        stacks: dict = {}
        for c in configs:
            stacks.setdefault(c.shape_key, []).append(c)
        largest = max(len(v) * v[0].d_sae for v in stacks.values())
        p.gpu["training"] = states + 8 * profile.train_batch * largest * 4  # the dense path's batch tensors

    # Time: FLOPs over the machine's rate; the CPU-only steps over the CPU's.
    rate = machine.rate
    cpu = THROUGHPUT["cpu"]
    f_sae = profile.pick_ratio * d                     # the chosen L1 SAE's features (and the random directions')
    f_topk = max((c.d_sae for c in configs if c.arch.matched_comparison), default=0)  # the matched TopK SAE
    signed = 2 * d                                     # PCA, ICA and neurons: both halves of d directions
    fwd = 2 * params
    harvest_tokens = profile.harvest_tokens + profile.eval_tokens + (scored.harvest_tokens if scored is not profile else 0)
    depth = (max(profile.layers) + 1) / n_layers          # the harvest stops after the deepest hooked layer
    p.seconds["01"] = fwd * depth * harvest_tokens / rate + harvest_tokens / 20_000  # + tokenising and writing
    train = 6 * d * sum(c.d_sae for c in configs) * profile.train_tokens
    p.seconds["02"] = train / rate + fwd * 8 * profile.ce_contexts * profile.ctx_len * len(configs) / rate + 30
    score = 2 * d * 2 * max(c.d_sae for c in configs) * score_n * 6
    # notebook 03: held-out scores (resampled) of the SAE, the TopK SAE, random directions at three
    # sparsities and the neurons; the interpretability curve (3 budgets of the sweep's snapshots, or of the
    # SAE retrained alone where the sweep keeps none, and random directions); claim 1's four TopK
    # controls of the chosen SAE's width; logit effects of the SAE's features
    train_03 = (0 if keep.on else 6 * d * f_sae * profile.train_tokens) + 4 * 6 * d * f_sae * profile.train_tokens
    heldout_03 = HELDOUT_RESAMPLED * score_n * (f_sae + f_topk + 3 * f_sae + signed + 3 * 2 * f_sae)
    p.seconds["03"] = ((score + train_03) / rate + (heldout_03 + LOGIT_EFFECTS * f_sae * d * VOCAB) / cpu + 60)
    # notebook 04, at every layer: held-out scores of every method (resampled, over ordinary tokens, and
    # plain, over all), PCA and ICA fits
    layer_train = 6 * d * 2 * max(c.d_sae for c in configs) * profile.train_tokens * (h - 1)
    heldout_04 = (HELDOUT_RESAMPLED + HELDOUT_PLAIN) * score_n * (3 * f_sae + f_topk + 3 * signed)
    ica = ICA_PER_ITER * profile.ica_tokens * d * d * profile.ica_max_iter + ICA_WHITEN * d ** 3
    p.seconds["04"] = (layer_train / rate + h * (6 * score / rate + (heldout_04 + ica + pca_fit) / cpu)
                       + 60)
    prompts = profile.ioi_prompts + profile.pronoun_prompts
    passes = prompts * (n_layers / profile.patch_layer_step * 3 + h * 6 * 8)
    # steering (section 6): calibration and cost runs over held-out contexts, then sampled continuations
    # (helpers.causal.steering.generate_ids: the prompt once, then one cached pass per new token), for
    # every concept, direction and KL target, and the unsteered ones

    st = comparison_settings(profile)
    settings = st.max_concepts * (len(METHODS) * len(st.targets) + 1)
    generated = settings * st.prompts * st.samples * (12 + st.n_new)
    costed = (st.max_concepts * len(METHODS) * (len(st.grid) + len(st.targets))
              * (st.calib_contexts + st.report_contexts) * profile.ctx_len)
    p.seconds["05"] = fwd * (passes * 20 + generated + costed) / rate + 60
    return p


def check(p: Plan, machine: Machine | None = None, margin: float = 0.9) -> None:
    """Raise PlanError if the plan does not fit `machine` (using at most `margin` of each resource)."""
    machine = machine or Machine.detect()
    gb = lambda b: f"{b / GB:.1f} GB"  # noqa: E731
    if p.scratch and machine.scratch_free_bytes and p.scratch_bytes > margin * machine.scratch_free_bytes:
        raise PlanError(f"profile {p.profile!r} needs {gb(p.scratch_bytes)} of local disk for working checkpoints, "
                        f"{gb(machine.scratch_free_bytes)} are free at $SAE_SCRATCH: point SAE_SCRATCH to a bigger "
                        "disk, or unset it to keep checkpoints in the cache")
    if p.disk_bytes > margin * machine.disk_free_bytes:
        trash = p.disk.get("replaced checkpoints in Drive's trash")
        raise PlanError(f"profile {p.profile!r} needs {gb(p.disk_bytes)} of disk, {gb(machine.disk_free_bytes)} are "
                        f"free at the cache: " + (f"set SAE_SCRATCH to a folder on the VM's disk (replaced "
                        f"checkpoints would leave {gb(trash)} in Drive's trash; with it, two copies are rewritten "
                        "in place), or " if trash else "")
                        + f"lower harvest_tokens (training store {gb(p.disk['training store'])}) "
                        "or the number of layers, or set SAE_CACHE to a bigger disk")
    if p.host_peak > margin * machine.host_bytes:
        big = max((k for k in p.host if k not in ("kernel", "model")), key=p.host.get)
        field_of = {"training (shuffle buffer)": "shard_contexts", "PCA fit": "pca_tokens", "ICA fit": "ica_tokens",
                    "loaded activations": "eval_tokens or score_tokens"}
        raise PlanError(f"profile {p.profile!r} needs about {gb(p.host_peak)} of RAM at its peak ({big}), this machine "
                        f"has {gb(machine.host_bytes)}: lower {field_of[big]}")
    if machine.gpu_bytes and p.gpu_peak > margin * machine.gpu_bytes:
        raise PlanError(f"profile {p.profile!r} needs about {gb(p.gpu_peak)} of GPU memory while training, this GPU "
                        f"has {gb(machine.gpu_bytes)}: lower train_batch, or the sweep's largest ratio "
                        "or its number of SAEs (the ratios and settings in grid)")
