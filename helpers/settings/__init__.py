"""Settings and where things live.

* ``profiles``: settings presets (test / cpu / gpu / colab / paper), chosen by $SAE_PROFILE, changed by $SAE_OVERRIDES
* ``paths``:    repository, data, cache and scratch locations, and results kept in the cache (``stored``)
* ``locks``:    cross-process locks on what the cache holds, and per-process temporary names
* ``memory``:   freed memory kept for a CPU process's next tensors (training steps, model passes)
"""
