"""The study file: TOML parsed into typed settings and checked, table by table, before anything runs."""
