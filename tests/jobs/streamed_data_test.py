"""The SAE job on a streamed Parquet corpus reads only the rows it needs; the LM job refuses
to train a tokenizer on a whole stream."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import demo
from interp import models
from interp.data import cache as cache_lib
from interp.data import documents as documents_lib
from interp.jobs import lm as lm_job
from interp.jobs import sae as sae_job
from interp.models import tokenizer as tokenizer_lib
from tests import runs
from tests.models.testing import LLAMA_LIKE

WORDS = "the whale sea ship captain rose from deep water and sailed into a storm at night".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A glob of two shards. The second has no 'text' column, so reading it fails a run: a
    job that finishes has stopped before it, having read only a part of the first."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(5, 30))) + "." for _ in range(4000)]
    pq.write_table(pa.table({"text": texts}), folder / "shard-0.parquet", row_group_size=250)
    pq.write_table(pa.table({"body": ["unread"]}), folder / "shard-1.parquet")
    return str(folder / "shard-*.parquet")


def _config(corpus):
    config = demo.get_config("tiny=True")
    return runs.override(config, **{
        "data.text_path": corpus,
        "data.max_documents": 0,  # No cap: only the rows the job needs bound its reading.
        "sae.saes": (config.sae.saes[0],),
        "sae.harvest_rows": 1024,
        "sae.train.steps": 2,
        "sae.train.checkpoint_every": 2,
        "sae.eval_batches": 1,
    })  # fmt: skip


def test_sae_job_harvests_from_a_parquet_corpus_without_reading_all_of_it(corpus, tmp_path):
    tokenizer = tokenizer_lib.train_bpe([" ".join(WORDS)] * 10, vocab_size=300)
    model_config = LLAMA_LIKE.replace(vocab_size=tokenizer.vocab_size, max_len=64)
    model_path = tmp_path / "model"
    models.save_pretrained(model_path, model_config, models.init_params(model_config), tokenizer)
    config = _config(corpus)
    config.sae.model_path = str(model_path)
    results = sae_job.run(config, str(tmp_path / "sae"))
    (metrics,) = results.values()
    assert metrics["num_tokens"] > 0 and np.isfinite(metrics["fvu"])
    cache = cache_lib.ActivationCache.open(tmp_path / "sae" / "activations")
    # The rows a harvest packs allow for each row's first position only; positions of the
    # excluded bos (here also the eos between documents) leave it a little short, as for the
    # built-in corpus.
    assert 0.95 * config.sae.harvest_rows < cache.num_rows <= config.sae.harvest_rows
    # Reading the whole glob fails on the second shard: the run above did not.
    train, _ = documents_lib.documents(config.data)
    with pytest.raises(ValueError, match=r"no column 'text'; its columns are \['body'\]"):
        sum(1 for _ in train)


def test_a_bpe_on_a_whole_stream_is_refused_before_the_workdir(corpus, tmp_path):
    config = _config(corpus)
    with pytest.raises(ValueError, match="would read all of it. Set config.tokenizer.path"):
        lm_job.run(config, str(tmp_path / "lm"))
    assert not os.path.exists(tmp_path / "lm" / "config.json")
