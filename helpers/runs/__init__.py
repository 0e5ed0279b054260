"""Runs: the profile's experiments end to end, as the notebooks run them.

* ``session``:  the one object a notebook starts from: the profile and the model, stores, sweep and SAEs it names
* ``sweep``:    the profile's sweep, the SAE it picks, and its twins at the other layers
* ``plan``:     the resource plan (disk, host RAM, GPU memory, time) of a profile on this machine
* ``claims``:   the notebooks' claims about the model, asserted where they were measured
* ``run_all``:  ``python -m helpers.runs.run_all``: execute every notebook headless, saving the results
* ``report``:   ``python -m helpers.runs.report``: docs/results.md from the executed notebooks' result cells
"""
