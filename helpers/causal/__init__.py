"""Causal experiments in a dictionary's basis.

* ``prompts``:  IOI and gendered-pronoun prompt sets
* ``patching``: activation patching, ablation-based editing and feature circuits
* ``steering``: steering along a feature or a difference of means at a measured cost, and the playground
"""
