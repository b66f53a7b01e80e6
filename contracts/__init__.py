"""What the services (backend, worker, trainer) agree on: names in Redis and the shapes kept
under them, payloads, settings, errors. Nothing here runs the model or stores it.

* :mod:`contracts.settings`: every ``SAM2UNET_*`` setting, read once per process;
* :mod:`contracts.connections`: the Redis client every service opens the same way;
* :mod:`contracts.errors`: errors shared by the services, each with its HTTP status;
* :mod:`contracts.jobs`: queue names, job payloads and results, the rq job targets
  (``worker.jobs.*``, named by string);
* :mod:`contracts.preannotate`, :mod:`contracts.routing`: project-wide runs, and prompts routed
  to the worker holding an image's features;
* :mod:`contracts.events`: the trainer's event stream (webhooks and scheduled rounds);
* :mod:`contracts.schedule`, :mod:`contracts.trainer_state`, :mod:`contracts.agents`: the
  training schedule, the trainer's state and its train agents, as the others read them;
* :mod:`contracts.metrics`: metric definitions and recording;
* :mod:`contracts.untrained`: the mark of an automatic prediction an untrained version did not
  make.

It imports nothing of ours but a torch-free part of :mod:`sam2unet` (the names of the
acquisition strategies, checked by the settings), and never torch, directly or through what it imports
(tests/test_layers.py checks both): the backend imports it and never loads the model. Model
versions and their files are :mod:`modelstore`.
"""
