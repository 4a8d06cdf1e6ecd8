"""pytest's hooks for the suite; the helpers the tests share are in support.py."""

# The two files that take minutes each (whole pipelines in temporary repos). `make test` runs files
# side by side, one per worker (pytest-xdist's --dist loadfile, in collection order): listing these
# first starts one on each of two workers instead of both, one after the other, on the same.
LONGEST_FILES = ("test_pipeline.py", "test_team.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # stable: the rest keep their order
