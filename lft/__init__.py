"""Shared non-model code of the LLM_Fine_Tuning toolkit, one concern per module (the model itself is
qwen3_classification_direct.py at the top level; the library never imports a script).

  common      user errors, the CLI wrapper, atomic writes, secret redaction, OOM hints
  labels      the label set, label normalisation, thresholds (no torch: the exporter and HTTP workers start fast)
  tables      reading and writing .xlsx/.csv/.jsonl/.parquet tables
  data        loading/validating a split, tokenising, batching and collation (padded, packed, fixed-shape)
  runtime     device, dtypes, packing, attention, compile, CUDA graphs: one frozen Runtime from shared flags
  base        the base model folder: completeness checks and identity
  adapter     the adapter folder on disk: save, load, verify, merged export, fingerprint
  predict     inference (Predictor: the one path used by evaluation, prediction and serving) and the
              Classifier API
  train_step  the training micro-step (eager or CUDA graph), the loss, the optimizer step, lagged flags
  cuda_graphs CUDA graphs over fixed-shape packed rows
  checkpoint  training checkpoints: atomic, sealed with sha256, verified and checked on resume
  outdir      the output folder's health: writable, free space, leftovers of killed writes, metrics log
  signals     SIGTERM/Ctrl-C as a stop request the loop acts on
  metrics     confusion matrix -> every reported metric, tables, PNG
  dist        torchrun/DDP set-up and the few collectives the scripts need
  early_stopping  patience on the validation macro-F1, with checkpointable state
  tracking    --report_to tensorboard/mlflow/wandb/trackio (local files, optional packages)
  config      --config FILE (YAML/JSON, a run's args.json) between the defaults and the command line
  serving     serve.py's HTTP worker processes: request checks, tokenising, both wire formats, metrics, drain
  engine      serve.py's model process: token-budget dynamic batching over every worker, supervising them
  demo        the embedded demo: a tiny local Qwen3 checkpoint, synthetic data, the scripts run end to end
"""
import logging as _logging

__version__ = "0.12.0"  # reported by serve.py's /info

# With torchao installed (lft.quantize), transformers and peft import it (--merge, the tests); on a CPU build of
# torch its CUDA extensions then log "Failed to load ..._C_*.so" and torch logs a deprecation per torchao enum. Neither is
# about this toolkit, and both would land in every script's output: only their errors are let through.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
