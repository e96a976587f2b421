"""The test suite, a package: tests import their shared helpers as `tests.helpers.<name>`."""
