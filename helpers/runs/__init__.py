"""Runs: the profile's experiments end to end, as the notebooks run them.

* ``sweep``:    the profile's sweep, the SAE it picks, and its twins at the other layers
* ``plan``:     the resource plan (disk, host RAM, GPU memory, time) of a profile on this machine
* ``claims``:   the notebooks' claims about the model, asserted where they were measured
* ``run_all``:  ``python -m helpers.runs.run_all``: execute every notebook headless, saving the results
"""
