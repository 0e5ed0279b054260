"""Sparse autoencoders: the models, their training, their files, and a lab with known ground truth.

* ``stack``:    the SAE model (a stack of SAEs trained together), its losses, and SAELens files
* ``architectures``: one object per architecture (ReLU + L1, TopK, BatchTopK, JumpReLU, Matryoshka BatchTopK)
* ``sparse``:   sparse-code kernels: decoder and backward passes that touch only the active latents
* ``train``:    the trainer (Adam, resampling, AuxK, checkpoints) over a store, at one or several hooks
* ``groundtruth``: synthetic activations from known features; every architecture scored against the truth
* ``toy``:      Elhage et al.'s toy model of superposition: more sparse features than dimensions
"""
