"""A text classifier over dirty web pages, as a pipeline of stages (issue 21): ``data.py`` makes
the pages, ``stages.py`` cleans, featurizes and labels them, ``model.py`` is the network.
README.md beside this file says how to serve and train it, in one process or split."""
