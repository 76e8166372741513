"""Every tag, param, file and environment name the processes of a study share through the tracking store."""

from __future__ import annotations

DEFAULT_EXPERIMENT = "nanosweep"
PARENT_RUN_TAG = "mlflow.parentRunId"
CHECKPOINT = "ckpt.pt"
# the metric a study compares: logged first, so a SQLite store lists it first and the MLflow UI's compare
# view (which preselects the first metric the runs share) plots it in parallel coordinates by default
PRIMARY_METRIC = "val_loss"
# what resuming reads, and checks against the run (checkpoint.mismatch)
CHECKPOINT_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "rng", "eval_losses")

# Tags that place a run in the study; analysis filters on them (`tags.member = 'deep_large'`).
MEMBER_TAG = "member"  # shallow_small, deep_small, ... (a file in sweeps/)
PROFILE_TAG = "profile"  # full (the study's recipe) or quick (CPU-sized); never mixed in analysis
GRID_POSITION_TAG = "grid_position"  # 1-based position in the member's grid, also the seed
GLOBAL_ID_TAG = "global_id"  # the study's id across members (1-128)
REPLICATE_TAG = "replicate"  # 1-based seed replicate of the grid point; runs without it are replicate 1
CONFIG_HASH_TAG = "config_hash"  # TrainConfig.config_hash: equal hashes train the same thing
RUN_KIND_TAG = "run_kind"  # trial (of a sweep), train (nanosweep train alone), sweep, analysis or imported

# the values of RUN_KIND_TAG
TRIAL_RUN = "trial"  # one grid point of a sweep
TRAIN_RUN = "train"  # `nanosweep train` alone (a run without the tag is one too)
SWEEP_RUN = "sweep"  # a sweep's parent run
SEARCH_RUN = "search"  # a search's parent run
SEARCH_TRIAL_RUN = "search_trial"  # one trial of a search
ANALYSIS_RUN = "analysis"  # an analysis of finished runs, holding its files
IMPORTED_RUN = "imported"  # a run of the notebooks' study, imported from its CSV and checkpoints
MODEL_RUN_KINDS = (TRIAL_RUN, TRAIN_RUN, IMPORTED_RUN)  # runs that hold a trained model, named by `sample --name`

# where and how a run was trained, and how it ended
HOST_TAG = "nanosweep.host"  # machine of the process training the run (for people: liveness is the heartbeat)
PID_TAG = "nanosweep.pid"  # its process id there
FUSED_GROUP_TAG = "fused_group"  # runs with the same value trained together as one stacked model
EXECUTOR_TAG = "executor"  # local or ray: what ran the trial's process
NODE_TAG = "node"  # where: the host name (local) or the Ray node id
RESUMED_FROM_TAG = "nanosweep.resumed_from"  # the checkpoint iteration the run's last process continued from
CHECKPOINT_ITER_TAG = "nanosweep.checkpoint_iter"  # the iteration of the run's latest uploaded checkpoint
IMPORTED_FROM_TAG = "nanosweep.imported_from"  # the study folder an imported run came from
END_REASON_TAG = "nanosweep.end_reason"  # why the run's last process ended it FAILED or KILLED (or stopped it early)

# set for a trial process by its executor
EXECUTOR_ENV = "NANOSWEEP_EXECUTOR"  # the executor that started it
NODE_ENV = "NANOSWEEP_NODE"  # ... and the node it runs on

# A RUNNING run is alive while its trial process or its driver (sweep, search) keeps this tag fresh: unix
# seconds, stamped every heartbeat_seconds(). Older than STALE_BEATS beats, it is dead wherever it ran and is
# resumed from its checkpoint. Machines' clocks must agree to well within that (NTP).
HEARTBEAT_TAG = "nanosweep.heartbeat"
HEARTBEAT_ENV = "NANOSWEEP_HEARTBEAT_SECONDS"  # the beat; the same on every machine of a study
DEFAULT_HEARTBEAT_SECONDS = 15.0
STALE_BEATS = 4  # missed beats before a run counts as dead: 60 s by default

# claims (tracking.claims)
CLAIM_PREFIX = "nanosweep.claim"  # claims are experiments named nanosweep.claim/<experiment id>/<scope>/<hash>/<n>
CLAIM_DRIVER_TAG = "nanosweep.driver"  # on a claim: the parent run of the sweep or search that made it
