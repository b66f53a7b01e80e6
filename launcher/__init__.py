"""``sam2unet-assist up``: the whole system on one machine (Redis, backend, workers, trainer),
each service a child process.

* :mod:`launcher.up`: starting, watching and stopping everything, in order;
* :mod:`launcher.processes`: child processes, their process groups and liveness;
* :mod:`launcher.redis_server`: the embedded ``redis-server``;
* :mod:`launcher.state_file`: ``MODEL_DIR/up.json``, the pids of a running ``up``;
* :mod:`launcher.messages`: what ``up`` tells its user (the model served, how to connect Label
  Studio).

It sits at the top with ``cli`` and may import any package of ours (tests/test_layers.py);
only ``cli`` and ``bench`` import it.
"""
