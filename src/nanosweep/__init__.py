"""nanosweep: hyperparameter studies of small GPTs on tiny Shakespeare, tracked in MLflow.

Data flow: config -> data -> model -> train -> tracking/trial -> sweep -> analysis.
"""
