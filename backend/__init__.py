"""The backend service: the Label Studio ML backend (HTTP), which queues work for the workers
and records events for the trainer. It never loads the model.

* :mod:`backend.server`: running the app under gunicorn (the master imports none of the app);
* :mod:`backend.app`: the Flask application, its error handling and JSON error bodies;
* :mod:`backend.protocol`: the protocol's endpoints (/health, /setup, /predict, /webhook,
  /versions);
* :mod:`backend.schemas`: request bodies parsed into typed objects at the boundary;
* :mod:`backend.predict`: a /predict request split into queued jobs, their replies gathered;
* :mod:`backend.events`: webhook events recorded in the trainer's event stream;
* :mod:`backend.auth`: basic auth and the webhooks' shared secret;
* :mod:`backend.metrics`: the ``/metrics`` endpoint (Prometheus);
* :mod:`backend.openapi`, :mod:`backend.openapi_schemas`: the OpenAPI document.

It may import :mod:`contracts`, :mod:`labelstudio`, :mod:`modelstore` and :mod:`sam2unet`,
never :mod:`worker` or :mod:`trainer` (tests/test_layers.py); ``cli`` and ``bench`` import it
(``launcher`` starts it as a process).
"""
