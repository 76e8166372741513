-- The basic-auth app keeps its users in a database of its own (run once, when the volume is new).
CREATE DATABASE mlflow_auth;
