"""The model store: model versions on disk and the current one in Redis, and what provisions
them.

* :mod:`modelstore.registry`: versions (deltas over a base checkpoint), their records, the
  current pointer, promotion and rollback;
* :mod:`modelstore.bootstrap`: a first version when the registry has none (an official SAM2
  checkpoint, downloaded released weights, or a random trunk);
* :mod:`modelstore.pretrained`: the authors' released SAM2-UNet weights (download, verify);
* :mod:`modelstore.version_heads`: which head serves a version's prompts (the checkpoint
  holding SAM2's prompt head) and whether its automatic head was trained;
* :mod:`modelstore.versions`: the versions table of ``/versions`` and ``versions show``;
* :mod:`modelstore.threads`: torch's CPU threads in a process that runs the model.

It may import :mod:`contracts` and :mod:`sam2unet` (torch, lazily where it can), nothing else
of ours; the services (backend, worker, trainer), ``cli``, ``launcher`` and ``bench`` import it.
``contracts`` never does (tests/test_layers.py).
"""
