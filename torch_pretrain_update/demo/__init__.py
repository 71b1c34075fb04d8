"""End-to-end demo: update a pretrained model on drifted data under a budget and compare the strategies.

An application of the library (it uses only its public names), run by ``pretrain-update demo``; see
:func:`run_demo`. What it does:

1. **Data.** scikit-learn's bundled digits (1,797 real 8x8 images, no download) are written into WebDataset
   shards with a manifest (:func:`~torch_pretrain_update.write_shards`) and read back through the strict shard
   reader and the safe decoder; ``--data`` reads the user's own shards instead (:mod:`.data`).
2. **Old and new distributions** (per seed). Half the classes, chosen at random, are *rare* in the old data
   (about 10x fewer samples than the common classes). The *new* data is a shifted mix: those rare classes are
   now the common ones, and every new image is translated by up to one pixel and gets Gaussian noise.
   Four disjoint parts: old train, old test (old class mix, clean), new pool (what the update may draw from) and
   new test (balanced, transformed) (:mod:`.data`).
3. **Pretraining** of a small CNN (an MLP for non-image inputs) on the old train part (:mod:`.models`).
4. **Update** with a budget (default 10% of the new pool): every selection strategy (random subset,
   stratified, entropy top-k, entropy proportional, class-balanced, entropy with a random half, and multi-round
   selection that re-scores the pool with the updated model each round; :mod:`.selection`) combined with every
   update method (plain fine-tuning, a partial update with the convolutional feature extractor frozen, and
   knowledge distillation from the old model with :class:`~torch_pretrain_update.KDLoss`). All runs of one seed
   start from the same pretrained model, and every strategy gets the same training recipe (no strategy is
   tuned). Seeds run in worker processes (:mod:`.runner`); stderr says what is going on (:mod:`.progress`).
5. **Report**: accuracy on the new and the old distribution (forgetting), recall of the classes that were rare
   in the old data, samples used and wall time, as mean and sample standard deviation over the seeds, plus the
   paired difference to random selection; ``report.md``, ``results.json`` (:mod:`.report`, :mod:`.results`) and
   ``results.png`` (:mod:`.plot`) in ``--out``. A ``--quick`` run says first that it is a smoke test.

These names are the demo's interface for the command line and its tests, not library API: the top-level package
does not re-export them.
"""

from torch_pretrain_update.demo.config import METRICS, REFERENCES, RUNS_PER_SEED, STRATEGIES, UPDATES, DemoConfig
from torch_pretrain_update.demo.data import (
    Arrays,
    Scenario,
    Split,
    build_scenario,
    load_shard_arrays,
    make_split,
    shift_and_noise,
    write_digits_shards,
)
from torch_pretrain_update.demo.models import SmallCNN, SmallMLP, evaluate, make_model, predict_logits, train
from torch_pretrain_update.demo.plot import DIFFERENCE_PANEL, plot_results, results_figure
from torch_pretrain_update.demo.progress import Progress
from torch_pretrain_update.demo.report import (
    SMOKE_TEST_HEADLINE,
    SMOKE_TEST_NOTE,
    console_summary,
    format_report,
    format_table,
    observations,
    write_outputs,
)
from torch_pretrain_update.demo.results import aggregate
from torch_pretrain_update.demo.runner import num_workers, run_demo
from torch_pretrain_update.demo.selection import budget_count, select_one_shot, select_rounds

__all__ = [
    "DIFFERENCE_PANEL",
    "METRICS",
    "REFERENCES",
    "RUNS_PER_SEED",
    "SMOKE_TEST_HEADLINE",
    "SMOKE_TEST_NOTE",
    "STRATEGIES",
    "UPDATES",
    "Arrays",
    "DemoConfig",
    "Progress",
    "Scenario",
    "SmallCNN",
    "SmallMLP",
    "Split",
    "aggregate",
    "budget_count",
    "build_scenario",
    "console_summary",
    "evaluate",
    "format_report",
    "format_table",
    "load_shard_arrays",
    "make_model",
    "make_split",
    "num_workers",
    "observations",
    "plot_results",
    "predict_logits",
    "results_figure",
    "run_demo",
    "select_one_shot",
    "select_rounds",
    "shift_and_noise",
    "train",
    "write_digits_shards",
    "write_outputs",
]
