# Engine versions CI tests, read from their one source, fmbc_serve/versions.py (also used by the plugins'
# version check; tests/unit/test_versions.py checks pyproject.toml's extras and the Docker files against it).
eval "$(python3 "$(dirname "${BASH_SOURCE[0]}")/../fmbc_serve/versions.py")"
