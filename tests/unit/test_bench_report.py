"""bench/run.py rewrites docs/benchmarks.md but keeps the fleet figures it does not measure."""

from pathlib import Path

from bench.run import KEPT_MARK, kept_tail


def test_the_fleet_section_survives_a_new_report(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# old node figures\n\n{KEPT_MARK}\n## Fleet\n10,000 nodes: 11 s\n")
    assert kept_tail(out) == f"\n{KEPT_MARK}\n## Fleet\n10,000 nodes: 11 s\n"


def test_without_the_mark_or_the_file_nothing_is_kept(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    assert kept_tail(out) == ""
    out.write_text("# only node figures\n")
    assert kept_tail(out) == ""


def test_every_benchmark_module_imports():
    """The benchmarks share helpers (bench.convergence); a renamed one breaks them silently
    until the next measurement, so importing them all is part of the suite."""
    import importlib
    import pkgutil

    import bench

    for module in pkgutil.iter_modules(bench.__path__):
        importlib.import_module(f"bench.{module.name}")
