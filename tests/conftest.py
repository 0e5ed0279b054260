import pytest


@pytest.fixture(scope="session")
def model():
    """The embedded model, loaded once for the whole session (dequantised once into the cache)."""
    from helpers import load_model

    return load_model(device="cpu")
