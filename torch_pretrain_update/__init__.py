"""torch-pretrain-update: drop-in data-layer pieces for updating pretrained models on new data.

Selection and balancing samplers, weight-emitting datasets and WebDataset streams, partial (incremental)
updates and distillation losses. Every public name is re-exported here; each module owns its ``__all__``.
"""

from torch_pretrain_update.data import decode as _decode
from torch_pretrain_update.data import errors as _data_errors
from torch_pretrain_update.data import inspect as _inspect
from torch_pretrain_update.data import labels as _labels
from torch_pretrain_update.data import limits as _limits
from torch_pretrain_update.data import manifest as _manifest
from torch_pretrain_update.data import member_decoder as _member_decoder
from torch_pretrain_update.data import shard_dataset as _shard_dataset
from torch_pretrain_update.data import stages as _stages
from torch_pretrain_update.data import stream as _stream
from torch_pretrain_update.data import strict_samples as _strict_samples
from torch_pretrain_update.data import tar_reader as _tar_reader
from torch_pretrain_update.data import weighted_dataset as _weighted_dataset
from torch_pretrain_update.data import write as _write
from torch_pretrain_update.data.decode import *  # noqa: F403
from torch_pretrain_update.data.errors import *  # noqa: F403
from torch_pretrain_update.data.inspect import *  # noqa: F403
from torch_pretrain_update.data.labels import *  # noqa: F403
from torch_pretrain_update.data.limits import *  # noqa: F403
from torch_pretrain_update.data.manifest import *  # noqa: F403
from torch_pretrain_update.data.member_decoder import *  # noqa: F403
from torch_pretrain_update.data.shard_dataset import *  # noqa: F403
from torch_pretrain_update.data.stages import *  # noqa: F403
from torch_pretrain_update.data.stream import *  # noqa: F403
from torch_pretrain_update.data.strict_samples import *  # noqa: F403
from torch_pretrain_update.data.tar_reader import *  # noqa: F403
from torch_pretrain_update.data.weighted_dataset import *  # noqa: F403
from torch_pretrain_update.data.write import *  # noqa: F403
from torch_pretrain_update.sampling import balanced as _balanced
from torch_pretrain_update.sampling import draws as _draws
from torch_pretrain_update.sampling import entropy_plan as _entropy_plan
from torch_pretrain_update.sampling import entropy_sampler as _entropy_sampler
from torch_pretrain_update.sampling import plans as _plans
from torch_pretrain_update.sampling import rounds as _selection_rounds
from torch_pretrain_update.sampling import samplers as _samplers
from torch_pretrain_update.sampling import weighted_sampler as _weighted_sampler
from torch_pretrain_update.sampling.balanced import *  # noqa: F403
from torch_pretrain_update.sampling.draws import *  # noqa: F403
from torch_pretrain_update.sampling.entropy_plan import *  # noqa: F403
from torch_pretrain_update.sampling.entropy_sampler import *  # noqa: F403
from torch_pretrain_update.sampling.plans import *  # noqa: F403
from torch_pretrain_update.sampling.rounds import *  # noqa: F403
from torch_pretrain_update.sampling.samplers import *  # noqa: F403
from torch_pretrain_update.sampling.weighted_sampler import *  # noqa: F403
from torch_pretrain_update.scoring import clusters as _clusters
from torch_pretrain_update.scoring import dedup as _dedup
from torch_pretrain_update.scoring import dedup_stage as _dedup_stage
from torch_pretrain_update.scoring import distributed as _distributed
from torch_pretrain_update.scoring import domain as _domain
from torch_pretrain_update.scoring import minhash as _minhash
from torch_pretrain_update.scoring import ngrams as _ngrams
from torch_pretrain_update.scoring import scores as _scores
from torch_pretrain_update.scoring import sequence as _sequence
from torch_pretrain_update.scoring import target as _target
from torch_pretrain_update.scoring import weights as _weights
from torch_pretrain_update.scoring.clusters import *  # noqa: F403
from torch_pretrain_update.scoring.dedup import *  # noqa: F403
from torch_pretrain_update.scoring.dedup_stage import *  # noqa: F403
from torch_pretrain_update.scoring.distributed import *  # noqa: F403
from torch_pretrain_update.scoring.domain import *  # noqa: F403
from torch_pretrain_update.scoring.minhash import *  # noqa: F403
from torch_pretrain_update.scoring.ngrams import *  # noqa: F403
from torch_pretrain_update.scoring.scores import *  # noqa: F403
from torch_pretrain_update.scoring.sequence import *  # noqa: F403
from torch_pretrain_update.scoring.target import *  # noqa: F403
from torch_pretrain_update.scoring.weights import *  # noqa: F403
from torch_pretrain_update.training import distill as _distill
from torch_pretrain_update.training import freeze as _freeze
from torch_pretrain_update.training import functional as _functional
from torch_pretrain_update.training import gradual as _gradual
from torch_pretrain_update.training import optim as _optim
from torch_pretrain_update.training import sparse_teacher as _sparse_teacher
from torch_pretrain_update.training import teacher_cache as _teacher_cache
from torch_pretrain_update.training import teacher_reader as _teacher_reader
from torch_pretrain_update.training.distill import *  # noqa: F403
from torch_pretrain_update.training.freeze import *  # noqa: F403
from torch_pretrain_update.training.functional import *  # noqa: F403
from torch_pretrain_update.training.gradual import *  # noqa: F403
from torch_pretrain_update.training.optim import *  # noqa: F403
from torch_pretrain_update.training.sparse_teacher import *  # noqa: F403
from torch_pretrain_update.training.teacher_cache import *  # noqa: F403
from torch_pretrain_update.training.teacher_reader import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [*_scores.__all__, *_weights.__all__, *_distributed.__all__, *_freeze.__all__, *_optim.__all__,
           *_gradual.__all__, *_draws.__all__, *_entropy_plan.__all__, *_balanced.__all__,
           *_weighted_sampler.__all__, *_entropy_sampler.__all__, *_decode.__all__, *_stages.__all__,
           *_weighted_dataset.__all__, *_distill.__all__, *_functional.__all__,
           *_sparse_teacher.__all__, *_teacher_cache.__all__, *_teacher_reader.__all__, *_plans.__all__,
           *_samplers.__all__,
           *_data_errors.__all__, *_inspect.__all__, *_labels.__all__, *_limits.__all__, *_manifest.__all__,
           *_member_decoder.__all__, *_strict_samples.__all__, *_tar_reader.__all__, *_write.__all__,
           *_shard_dataset.__all__, *_stream.__all__, *_selection_rounds.__all__,
           *_dedup.__all__, *_minhash.__all__, *_dedup_stage.__all__,
           *_clusters.__all__, *_sequence.__all__, *_ngrams.__all__, *_target.__all__,
           *_domain.__all__]
