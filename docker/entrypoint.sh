#!/bin/sh
# Parley container entrypoint: one image, one role per container.
#
#   web      the ASGI server (HTTP, SSE, WebSocket); PARLEY_WEB_SERVER picks which one
#   generator a generation worker: runs chat turns from the Redis job stream (manage.py
#            run_generators; extra arguments go to it, e.g. --concurrency 256 --metrics-port 9101)
#   worker   a Celery worker            (extra arguments go to `celery worker`)
#   beat     the Celery beat scheduler  (run exactly one)
#   migrate  manage.py migrate_all      (public schema, tenant template, every tenant)
#   manage   manage.py <arguments>      e.g. `manage tenant_create acme --name Acme ...`
#   anything else is executed verbatim, e.g. `daphne -b 0.0.0.0 -p 8000 config.asgi:application`
#
# Environment read here (the application's own settings are documented in docker/README.md):
#   PARLEY_WEB_SERVER   uvicorn (default: the fastest in tests/perf/test_chat_throughput.py) |
#                       granian | daphne (Channels' development server)
#   PORT                listening port of the web server (default 8000)
#   WEB_CONCURRENCY     worker processes for uvicorn/granian (default 1). Keep 1 and scale with
#                       replicas: Prometheus metrics are per process, so with more than one process
#                       per pod each scrape of /metrics sees only the process that answered.
#   FORWARDED_ALLOW_IPS uvicorn only: peers whose X-Forwarded-* headers are trusted (default *)
#   CELERY_LOG_LEVEL    worker and beat log level (default INFO)
set -eu

role="${1:-web}"
[ "$#" -gt 0 ] && shift

web() {
    port="${PORT:-8000}"
    # Every server is told to trust X-Forwarded-For/-Proto: the client address feeds login
    # throttling and rate limits. They take the left-most X-Forwarded-For entry, so the proxy in
    # front (nginx, the ingress controller) must overwrite that header, not append to it, and the
    # pods must not be reachable except through it.
    case "${PARLEY_WEB_SERVER:-uvicorn}" in
        daphne)
            exec daphne --bind 0.0.0.0 --port "$port" --proxy-headers "$@" config.asgi:application
            ;;
        uvicorn)
            # Channels' ProtocolTypeRouter has no "lifespan" handler: switch the protocol off.
            exec uvicorn --host 0.0.0.0 --port "$port" --workers "${WEB_CONCURRENCY:-1}" \
                --loop uvloop --http httptools --no-access-log \
                --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-*}" \
                --lifespan off "$@" config.asgi:application
            ;;
        granian)
            # asginl: ASGI without the lifespan protocol (see uvicorn above). Check
            # `granian --help` of the installed version for proxy-header support.
            exec granian --interface asginl --host 0.0.0.0 --port "$port" \
                --workers "${WEB_CONCURRENCY:-1}" "$@" config.asgi:application
            ;;
        *)
            echo "parley-entrypoint: PARLEY_WEB_SERVER must be daphne, uvicorn or granian, not '${PARLEY_WEB_SERVER}'" >&2
            exit 64
            ;;
    esac
}

case "$role" in
    web)
        web "$@"
        ;;
    generator)
        exec python manage.py run_generators "$@"
        ;;
    worker)
        exec celery -A config worker --loglevel "${CELERY_LOG_LEVEL:-INFO}" "$@"
        ;;
    beat)
        # The schedule state file lives in /tmp: the image's /app is read-only for the app user.
        exec celery -A config beat --loglevel "${CELERY_LOG_LEVEL:-INFO}" \
            --schedule /tmp/celerybeat-schedule "$@"
        ;;
    migrate)
        exec python manage.py migrate_all "$@"
        ;;
    manage)
        exec python manage.py "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
