"""Fake `kind`, `docker` and `helm` executables for tests (never shipped in lab/).

Put ``BIN_DIR`` first on PATH and point ``LAB_FAKE_STATE`` at a temp directory::

    from tests.fakes import fake_env, read_calls, read_state, write_state
    env = fake_env(tmp_path / "fake")          # PATH + LAB_FAKE_STATE
    subprocess.run(["kind", "get", "clusters"], env=env)

See fakelib.py's docstring and test_fakes.py for the state files and injection knobs.
"""

from .fakelib import BIN_DIR, FAKES_DIR, STATE_ENV, fake_env, read_calls, read_state, write_state

__all__ = ["BIN_DIR", "FAKES_DIR", "STATE_ENV", "fake_env", "read_calls", "read_state",
           "write_state"]
