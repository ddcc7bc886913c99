"""The measurement scripts, run from the repository root as `python -m scripts.<name>`: a package, so that
they import each other (`from scripts.bench_loop import ...`) and tests import them, with no path edits."""
