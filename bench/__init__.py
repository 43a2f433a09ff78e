"""Side-by-side benchmarks of Muster against restic, borg and a plain tar | zstd | age pipeline.

`python -m bench.run` measures; `bench/install.sh` installs the peers; docs/benchmarks.md holds
the latest results. Timed assertions never go into tests: performance is measured here.
"""
