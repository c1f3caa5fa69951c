"""``cax web``: a read-only website over the runs DB, for the people who would rather look at a
page than at a terminal -- which runs are where, what is missing, which daemon went quiet,
what is stuck and why, how much moved each day.

``views`` builds each page's value (the JSON of ``cax status`` where one exists), ``svg`` the
throughput chart, ``background`` the report too slow to compute while a visitor waits,
``auth`` decides who may read, ``app`` is the Flask application and ``server`` runs it with
waitress.
"""
