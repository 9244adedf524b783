"""Shared fixtures: small deterministic batches for the model tests; one PyTorch thread."""

import pytest
import torch

ARCHITECTURES = ("shared_then_expert", "expert_only", "token_ffn")


@pytest.fixture(scope="session", autouse=True)
def _no_user_cache(tmp_path_factory):
    """The planner's cache (traces, device probes, the benchmark lock) in a directory of the session's own,
    never the user's: tests that need their own set theirs over it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(tmp_path_factory.mktemp("session_cache")))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    """One planner cache for the modules that only read traces through it (the cost tests): a step traced by
    one is read by the others, as a user's cache would be. Tests of locks, probes or the cache itself keep
    their own."""
    return tmp_path_factory.mktemp("shared_cache")


def _on_threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """PyTorch on one thread for the test, its thread count restored after."""
    yield from _on_threads(1)


@pytest.fixture
def two_threads():
    """PyTorch on two threads for the test (whatever the machine's cores), its thread count restored after."""
    yield from _on_threads(2)


def token_batch(batch: int, encoder_tokens: int, decoder_tokens: int, vocab: int = 4096):
    """Random (input_ids, attention_mask, labels) in the Chronos token range (ids ≥ 2)."""
    input_ids = torch.randint(2, vocab, (batch, encoder_tokens))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, vocab, (batch, decoder_tokens))
    return input_ids, attention_mask, labels
