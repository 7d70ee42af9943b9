"""Pipeline stages: plain typed functions, each wrapped as a Prefect task (`<name>_task`)."""
