"""The nvmprov benchmark (bench/run.py); never run by CI."""
