"""The benchmarks: timing and quality measurements, never part of the installed package.

Each one runs from the repository root as a module, ``python -m bench.<name>`` (e.g.
``.venv/bin/python -m bench.collapse report``; see bench/README.md), and imports the core as the
installed ``locphylax_core`` and its siblings as ``bench.<name>``. Helpers shared by several
benchmarks live in ``bench.common``.
"""
