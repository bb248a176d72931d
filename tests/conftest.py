"""Shared test setup: an offline environment, a fixed torch seed, and factories for tiny configs and models.

The environment variables are set at import, before any test module imports transformers, datasets or
MLflow, so no test reaches the hub or a telemetry host.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.config import load_config  # noqa: E402
from harness.modeling import EntropyGPTForCausalLM, model_config_from_run  # noqa: E402

SEED = 1234

# 2 layers, 2 heads, d=32, T=16, vocab 64: small enough for a forward and backward pass in milliseconds
TINY_OVERRIDES = ["model.size=tiny", "data.context_length=16", "data.vocab_size=64"]

torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def seed_torch():
    """Seed torch before every test, so each test gets the same random numbers whether it runs alone or in a suite."""
    torch.manual_seed(SEED)


@pytest.fixture
def tiny_config():
    """Return a factory: tiny_config(preset=None, overrides=()) -> a validated tiny RunConfig."""

    def make(preset=None, overrides=()):
        return load_config(preset, [*TINY_OVERRIDES, *overrides])

    return make


@pytest.fixture
def tiny_model(tiny_config):
    """Return a factory: tiny_model(preset=None, overrides=()) -> an EntropyGPTForCausalLM in train mode."""

    def make(preset=None, overrides=()):
        model = EntropyGPTForCausalLM(model_config_from_run(tiny_config(preset, overrides)))
        return model.train()

    return make


@pytest.fixture
def random_tokens():
    """Return a factory: random_tokens(batch, length, vocab=64) -> (batch, length) int64 token ids."""

    def make(batch=2, length=16, vocab=64):
        return torch.randint(0, vocab, (batch, length))

    return make


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """Create one empty MLflow SQLite store per session; MLflow's table migrations take seconds per store."""
    from harness.tracking import make_client

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    make_client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(mlflow_db_template):
    """Return a factory: mlflow_db(folder) copies an empty, migrated MLflow store to folder/mlflow.db."""
    import shutil

    def make(folder):
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "mlflow.db"
        shutil.copyfile(mlflow_db_template, target)
        return f"sqlite:///{target}"

    return make
