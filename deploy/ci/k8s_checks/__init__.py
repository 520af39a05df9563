"""The checks of deploy/ci/check_k8s.py (the entry point and its command line), by concern."""
