"""Evaluations of a dictionary.

* ``reconstruction``: L0, FVU (all / ordinary / massive tokens), dead latents, CE-loss recovered and KL, MMCS, PCA reference
* ``features``:  feature statistics in one pass, concept labels, in-sample concept scores, logit effects
* ``heldout``:   held-out, sparsity-matched concept scores with nulls and context-resampled intervals
* ``protocols``: the paper's explain-and-simulate protocol and delphi's detection score without an LLM (concept explainer), score distributions with paired context intervals
* ``probing``:   sparse probing (k-sparse probes on POS and genre tasks), SAEBench JSON
* ``absorption``: first-letter feature absorption (SAEBench's definitions), SAEBench JSON
* ``autointerp``: explain -> simulate -> score (local model or an OpenAI-compatible endpoint)
"""
