"""Where activations come from: a model, a corpus, and the on-disk store a harvest fills.

* ``hooks``:    hook names (``blocks.{layer}.hook_{kind}``), built and parsed in one place
* ``models``:   load a model as a TransformerLens TransformerBridge (embedded SmolLM2 by default)
* ``corpus``:   the Brown Corpus (embedded) or the Pile (hub stream or local files), as labelled token contexts
* ``store``:    the on-disk activation store (shards, manifest, checksums, shuffled batches)
* ``harvest``:  one model pass writing chosen hooks' activations to a store
* ``massive``:  massive activations: the rule that flags them and the treatment every dictionary gets
"""
