"""``make run``: the whole development stack in one foreground process.

Starts (or attaches to) the embedded PostgreSQL and Redis unless DATABASE_URL / REDIS_URL point
elsewhere, migrates, ensures the demo tenant, then runs the ASGI server, a generation worker, a Celery
worker and Celery beat under honcho. Ctrl-C stops all of them, then the embedded services it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("PARLEY_ENV", "development")
    os.chdir(BASE_DIR)
    env = dict(os.environ)
    if not env.get("REDIS_URL"):
        from config.embedded import ensure_redis

        env["REDIS_URL"] = ensure_redis()  # stopped by this process's exit
    if not env.get("DATABASE_URL"):
        from config.embedded import ensure_postgres

        ensure_postgres()  # this process holds a handle; the server stops when the last one exits
    python = sys.executable
    port = env.get("PORT", "8000")
    subprocess.run([python, "manage.py", "migrate_all", "-v", "0"], check=True, env=env)
    subprocess.run([python, "manage.py", "collectstatic", "--noinput", "-v", "0"], check=True, env=env)
    subprocess.run([python, "manage.py", "demo_setup", "--port", port], check=True, env=env)

    from honcho.manager import Manager

    bin_dir = Path(python).parent
    manager = Manager()
    manager.add_process("web", f"{bin_dir / 'daphne'} -b 127.0.0.1 -p {port} config.asgi:application", env=env)
    manager.add_process("generator", f"{python} manage.py run_generators", env=env)
    manager.add_process("worker", f"{bin_dir / 'celery'} -A config worker -l info --concurrency 2", env=env)
    manager.add_process(
        "beat", f"{bin_dir / 'celery'} -A config beat -l info -s {BASE_DIR / 'var' / 'celerybeat-schedule'}", env=env
    )
    manager.loop()
    return manager.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
