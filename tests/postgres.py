"""A throwaway PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary directory.

``initdb`` makes the cluster (password authentication, loopback only), ``pg_ctl`` starts and stops
it. PostgreSQL refuses to run as root, so under root (CI here) both run as the ``postgres`` user that
Debian's package creates, on a directory that user owns. The password is in a passfile of mode 0600,
which the DSNs name, as docs/serving.md asks of a real deployment.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from shoprank.entrypoint import free_port

USER = "shoprank"


def postgres_bin(name: str) -> str:
    """Where ``name`` (initdb, pg_ctl) is: on PATH, else Debian's versioned directory (the newest)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (`make test` does)")
    return found


class PostgresServer:
    """One server on a free loopback port; :meth:`database` gives each test an empty database."""

    def __init__(self) -> None:
        self.as_root = os.geteuid() == 0
        # under /tmp, not pytest's 0700 tree, so that the postgres user can reach it; short for the socket path
        self.directory = Path(tempfile.mkdtemp(prefix="srpg-", dir="/tmp"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.passfile = self.directory / "pgpass"
        self._password = secrets.token_hex(16)
        self._count = 0

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        pwfile = self.directory / "initial-password"
        pwfile.write_text(self._password + "\n")
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                  "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.directory} "
                   "-c fsync=on -c synchronous_commit=on")
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        self.passfile.write_text(f"127.0.0.1:{self.port}:*:{USER}:{self._password}\n")
        self.passfile.chmod(0o600)

    def stop(self) -> None:
        try:
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        """A DSN without the password: libpq reads it from :attr:`passfile`."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}?passfile={self.passfile}"

    def database(self) -> str:
        """A new, empty database's DSN."""
        self._count += 1
        name = f"events_{self._count}"
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)
