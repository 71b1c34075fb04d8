"""Language-model demo: update a pretrained byte-level LM on new raw text under a budget, and compare the strategies.

An application of the library, run by ``pretrain-update demo lm``; see :func:`run_lm_demo`. Everything it reads
ships with Python (nothing is downloaded):

1. **Data** (:mod:`.data`). Old domain: the standard library's source code. New domain: the English prose of
   ``pydoc_data.topics``. Per seed, whole files go to the old model's training part, an old test part or the raw
   pool; the pool also gets prose and whatever other text the standard library directory holds (licence, IDLE
   help, e-mail test messages, numeric test tables), then planted exact copies and near copies (a few bytes
   changed) of some of its chunks. The target is a small sample of prose outside the pool; the new test part is
   prose of topics nothing else uses.
2. **Pretraining** of a small byte-level transformer (:mod:`.model`) on the old training part.
3. **Scoring** the pool once with the old model and the target (:mod:`.strategies`): per-chunk perplexity
   (``sequence_scores``), k-means pseudo-classes of mean-pooled hidden states (``kmeans_labels``), hashed n-gram
   importance weights toward the target (``hashed_ngram_features``, ``target_log_ratio``) and near duplicates
   (``near_duplicate_mask``).
4. **Update** on a budget (default 10% of the pool): every strategy (random, perplexity top-k, perplexity + 50%
   random, target-matched, de-duplicated + target-matched, cluster-balanced), each through a library sampler,
   with every update method (fine-tuning, partial update with embeddings and lower blocks frozen, token-level KD
   from the old model). Seeds run in worker processes; stderr says what is going on.
5. **Report** (:mod:`.results`, :mod:`.report`, :mod:`.plot`): bits per byte on held-out prose (new) and source
   code (old: forgetting), mean and std over the seeds, paired differences to random; ``report.md``,
   ``results.json`` and ``results.png``. A ``--quick`` run says first that it is a smoke test.

These names are the demo's interface for the command line and its tests, not library API.
"""

from torch_pretrain_update.demo.lm.config import LM_METRICS, LM_STRATEGIES, LM_UPDATES, LMConfig
from torch_pretrain_update.demo.lm.data import SOURCE_NAMES, Corpus, Sources, build_corpus, chunk_bytes, find_sources
from torch_pretrain_update.demo.lm.model import ByteLM, Encoded, bits_per_byte, encode, lower_part, train_lm
from torch_pretrain_update.demo.lm.plot import OLD_DIFFERENCE_PANEL, lm_results_figure
from torch_pretrain_update.demo.lm.report import LM_SMOKE_TEST_NOTE, format_table, lm_observations
from torch_pretrain_update.demo.lm.results import aggregate, lm_difference, lm_row
from torch_pretrain_update.demo.lm.runner import lm_processes, run_lm_demo, run_lm_seed, update_steps
from torch_pretrain_update.demo.lm.strategies import PoolScores, budget_count, score_pool, select, selection_stats

__all__ = [
    "LM_METRICS",
    "LM_SMOKE_TEST_NOTE",
    "LM_STRATEGIES",
    "LM_UPDATES",
    "OLD_DIFFERENCE_PANEL",
    "SOURCE_NAMES",
    "ByteLM",
    "Corpus",
    "Encoded",
    "LMConfig",
    "PoolScores",
    "Sources",
    "aggregate",
    "bits_per_byte",
    "budget_count",
    "build_corpus",
    "chunk_bytes",
    "encode",
    "find_sources",
    "format_table",
    "lm_difference",
    "lm_observations",
    "lm_processes",
    "lm_results_figure",
    "lm_row",
    "lower_part",
    "run_lm_demo",
    "run_lm_seed",
    "score_pool",
    "select",
    "selection_stats",
    "train_lm",
    "update_steps",
]
