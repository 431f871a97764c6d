"""Runs one test file with pytest: the main of every py_test in BUILD (Bazel runs files, not pytest)."""

import os
import sys

import pytest

if __name__ == "__main__":
    test_file = sys.argv[1]
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(test_file))))
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", test_file, *sys.argv[2:]]))
