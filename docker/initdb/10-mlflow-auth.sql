-- The basic-auth app keeps its users in a database of its own, and `nanosweep search` its Optuna studies
-- (run once, when the volume is new).
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
