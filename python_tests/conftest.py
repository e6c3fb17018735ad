import raphael_ext  # noqa: F401  (loads the extension and registers the ops before any test)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
