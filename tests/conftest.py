"""Shared fixtures. Everything runs offline: the Hub is disabled for the whole session."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _xdist_threads() -> int | None:
    """Torch threads per pytest-xdist worker: the cores shared out among the workers, so that
    ``pytest -n 2`` on 2 cores runs 2 threads, not 2 x 2 (oversubscribed OpenMP threads spin and made one
    test file 2.5x slower). ``None`` outside a worker or when the user set ``OMP_NUM_THREADS``."""
    if "PYTEST_XDIST_WORKER" not in os.environ or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, cores // max(1, workers))


_THREADS = _xdist_threads()
if _THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # before torch loads; subprocesses of tests inherit it

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Directory holding the tiny Llama (seed 0) and its tokenizer, written with save_pretrained."""
    from lowmem.kit import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    from lowmem.kit import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model():
    """A fresh tiny Llama (seed 0) and its tokenizer, built in memory."""
    from lowmem.kit import build_tiny_model

    return build_tiny_model(seed=0)


# a fixture shared by a file's tests: a process group spawned once, a built wheel, a fresh-process measurement
_SHARED_FIXTURE = re.compile(r"""scope\s*=\s*["'](?:module|class|package)["']""")


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` (pyproject's addopts): xdist's loadgroup scheduling, and the tests of a file that
    defines a module- (class-, package-) scoped fixture are one group, run on one worker, so the fixture runs
    once (under ``load`` each worker that got some of them ran it: test_fsdp.py's 2-process spawn twice). Every
    other test is handed out on its own, as under ``load``; the groups, largest first, start the run. (xdist's
    ``xdist_group`` marks are not seen under pytest 9, whose node ids xdist cannot append the group to.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    root, shared = config.rootpath, {}

    class FileFixtureGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            if scope != nodeid:  # an xdist_group mark
                return scope
            path = nodeid.split("::", 1)[0]
            if path not in shared:
                try:
                    shared[path] = bool(_SHARED_FIXTURE.search((root / path).read_text()))
                except OSError:
                    shared[path] = False
            return path if shared[path] else nodeid

    return FileFixtureGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run with LOWMEM_SLOW=1 or when selected with ``-m slow``; ``cuda`` tests skip
    cleanly without a GPU."""
    import torch

    if _THREADS is not None:  # in case torch was imported before this file
        torch.set_num_threads(_THREADS)
    run_slow = os.environ.get("LOWMEM_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set LOWMEM_SLOW=1 or select with -m slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


# A chat template over the kit's character alphabet (no newlines): "u:12+7=|a:19<eos>|".
# Each assistant turn ends with eos, and the generation prompt is exactly the prefix "a:" that
# an assistant turn starts with (TRL checks prompt-completion prefixes).
OWN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}|{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture(scope="session")
def own_model_dir(tmp_path_factory):
    """A user's model directory, written offline: the tiny Llama (seed 0, transformers' LlamaConfig) and
    the kit's character tokenizer (built with ``tokenizers``) carrying a Jinja chat template."""
    from lowmem.kit import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    tok.chat_template = OWN_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("own-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ChatML, as many chat models use: special tokens and newlines (the BPE tokenizer below has both).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A user's model directory with a subword tokenizer: a byte-level BPE trained with ``tokenizers``
    on a few KB of generated text (vocabulary 400), ChatML special tokens and template, and a tiny
    Llama sized to it (transformers' LlamaConfig, seed 0)."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from lowmem.kit import tiny_config

    rng = random.Random(0)
    words = "the model adds two numbers and answers with the sum of them as digits".split()
    corpus = [f"{a}+{b}={a + b}" for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(400))]
    corpus += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(100)]  # ~5 KB in all
    special = ["<pad>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"], model_max_length=128)
    tok.chat_template = CHATML_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("bpe-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
