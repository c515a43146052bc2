"""grain input pipelines: sources (Fashion-MNIST IDX, image folders, TFDS), transforms, pretraining,
fine-tuning and eval batches.

from prmim_jax.data import data_config, pretrain_dataset, eval_dataset

config = data_config()  # Fashion-MNIST from /usr/share/datasets/fashion-mnist, 28x28x1
ds = pretrain_dataset(config, layout, "furthest", global_batch=256, process_index=0, process_count=1)
iterator = iter(ds)
batch = next(iterator)  # images, labels, ids_visible, ids_decoded, ids_thrown
state = iterator.get_state()  # a JSON-serialisable dict; iterator.set_state(state) resumes exactly
"""

from prmim_jax.data.pipeline import (
    eval_dataset,
    finetune_dataset,
    local_batch_size,
    make_source,
    pretrain_dataset,
)
from prmim_jax.data.schema import SOURCES, check_config, data_config

__all__ = [
    "SOURCES",
    "check_config",
    "data_config",
    "eval_dataset",
    "finetune_dataset",
    "local_batch_size",
    "make_source",
    "pretrain_dataset",
]
