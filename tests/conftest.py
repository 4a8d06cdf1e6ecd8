"""pytest's hooks for the suite; the helpers the tests share are in support.py."""

# The files that take minutes each (whole pipelines in temporary repos, interrupted stages), longest
# first. `make test` runs files side by side, one per worker (pytest-xdist's --dist loadfile, in
# collection order): starting these first spreads them over the workers instead of leaving the
# longest to start last.
LONGEST_FILES = ("test_pipeline.py", "test_team.py", "test_interrupts.py", "test_workflows.py", "test_equivalence.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # stable: the rest keep their order
