"""The test suite, a package so that test files import shared builders as ``from tests.helpers import ...``."""
