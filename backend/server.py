"""Running the backend under gunicorn (threads, so that waiting /predict requests do not block
each other)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from contracts.settings import Settings


class _GunicornApp(BaseApplication):
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        # imported here, in each gunicorn worker after the fork: the master process, which
        # only supervises, then never loads the app's modules (label_studio_sdk, numpy:
        # about 50 MB of resident memory)
        from backend.app import create_app

        return create_app(self.settings)


def serve(
    settings: Settings, host: str = "0.0.0.0", port: int = 9090, workers: int = 2, threads: int = 16
) -> None:
    """Serve the backend until stopped (SIGINT/SIGTERM stop it gracefully)."""
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": int(settings.predict_deadline) + 30,
        "graceful_timeout": 10,
        "loglevel": settings.log_level.lower(),
        "accesslog": "-",
        "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(L)ss',
    }
    _GunicornApp(settings, options).run()
