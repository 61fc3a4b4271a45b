"""The HDF5 run file: its layout, life (atomic writes, locks, resume), datasets and readers. Only this package opens
HDF5 files; the stages work on the groups and datasets it hands them, at the paths of `layout`."""

import h5py

from ntk_explain.store.arrays import (
    checkpoint,
    create_rows,
    encode_features,
    features_dataset,
    read_features,
    tiles_done,
    write_array,
)
from ntk_explain.store.attrs import FORMAT_VERSION, attrs_dict, mark, provenance, set_attrs, storable
from ntk_explain.store.files import (
    RESUME_KEYS,
    check_target,
    create_run,
    open_run,
    partial_params,
    partial_path,
    scratch,
    scratch_path,
    update_run,
)
from ntk_explain.store.layout import SHARDED
from ntk_explain.store.read import (
    faithfulness,
    group_attrs,
    kernel_block,
    path_summary,
    read_attribution,
    root_attrs,
    saved_request,
    self_kernels,
    summarize,
)
from ntk_explain.store.shards import join_shards, shard_path

H5File, H5Group, H5Dataset = h5py.File, h5py.Group, h5py.Dataset  # the types the stages are handed

__all__ = [
    "FORMAT_VERSION",
    "RESUME_KEYS",
    "SHARDED",
    "H5Dataset",
    "H5File",
    "H5Group",
    "attrs_dict",
    "check_target",
    "checkpoint",
    "create_rows",
    "create_run",
    "encode_features",
    "faithfulness",
    "features_dataset",
    "group_attrs",
    "join_shards",
    "kernel_block",
    "mark",
    "open_run",
    "partial_params",
    "partial_path",
    "path_summary",
    "provenance",
    "read_attribution",
    "read_features",
    "root_attrs",
    "saved_request",
    "scratch",
    "scratch_path",
    "self_kernels",
    "set_attrs",
    "shard_path",
    "storable",
    "summarize",
    "tiles_done",
    "update_run",
    "write_array",
]
