"""Test-only modules of tests/test_verl_ray.py, loaded by verl in the processes of its trainer on Ray
(`VERL_USE_EXTERNAL_MODULES`): `cpu`, the CPU shims; `probe`, what the test reads back. Never imported by
prodsample."""
