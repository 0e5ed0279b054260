"""Dictionaries: one interface (directions, encode, decode) for SAEs and the baselines they are compared with.

* ``dictionary``: the interface, SAEs behind it, random directions and the neuron basis
* ``baselines``:  PCA and ICA dictionaries fitted on a store
* ``controls``:   controls for the interpretability comparison: token-mean oracle directions, a frozen-encoder
  SAE, a re-initialised model, latents shared between two SAEs
"""
