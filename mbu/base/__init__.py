"""The bottom layer: what every layer shares, importing none of them.

Exit codes and the command runner (:mod:`~mbu.base.command`), atomic and JSON writes
(:mod:`~mbu.base.files`), the names of a run folder's files (:mod:`~mbu.base.run_files`), and the
checks of store URLs (:mod:`~mbu.base.urls`). ``tests/test_package_layers.py`` keeps it a leaf.
"""
