"""Prediction before (``lowband plan``) and after (``lowband simulate``) training.

``plan.py``: every algorithm's communication plan (declared by the algorithm) priced over a budget
of steps, with a recommendation (docs/planner.md); ``hetero.py``: plans for uneven workers and sites;
``schedule.py`` and ``simulate.py``: a measured run projected to other worker counts, model sizes and
networks (docs/simulator.md); ``plan_cli.py`` and ``simulate_cli.py``: their command lines.
"""
