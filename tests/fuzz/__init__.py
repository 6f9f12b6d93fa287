"""Coverage-guided fuzzing (atheris) of what anonymous or badly configured peers can hand the gateway: one
harness per target (``fuzz_<target>.py``), its seeds under ``corpus/<target>/``, the runner in
``campaign.py``. ``test_fuzz_short.py`` runs each harness briefly with a fixed seed in the test suite;
``bench/fuzz.py`` runs the standing campaign (docs/security.md, "Fuzzing")."""
