"""Shared non-model code of the LLM_Fine_Tuning toolkit.

One concern per module:
  common  - user errors, the CLI wrapper, atomic writes, secret redaction
  tables  - reading and writing .xlsx/.csv/.jsonl/.parquet tables
  data    - label set, loading/validating a split, tokenising, batching (padded and packed)
  metrics - confusion matrix -> every reported metric (through scikit-learn)
  dist    - torchrun/DDP set-up and the few collectives the scripts need
  checkpoint - training checkpoints (atomic, sealed with sha256, verified on resume), the output folder's
            checks, and the SIGTERM/Ctrl-C stop request
  early_stopping - patience on the validation macro-F1, with checkpointable state
  tracking - --report_to tensorboard/mlflow/wandb/trackio (local files, optional packages)
  config  - --config FILE (YAML/JSON, a run's args.json) between the defaults and the command line
  demo    - the embedded demo: a tiny local Qwen3 checkpoint and a synthetic data set
"""
