"""What the notebooks show.

* ``plots``:     the figures
* ``dashboard``: feature dashboards and the ipywidgets browser
"""
