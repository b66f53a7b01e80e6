"""Speaking Label Studio: its API, its images and its formats, shared by the services.

* :mod:`labelstudio.client`: the REST API client (legacy tokens and personal access tokens),
  with :mod:`labelstudio.tasks_api` (tasks, annotations) and :mod:`labelstudio.predictions_api`
  (predictions created, imported, listed);
* :mod:`labelstudio.fetch`: guarded image fetching (size, time and address limits), with
  :mod:`labelstudio.guarded_get` (the GET itself), :mod:`labelstudio.addresses` (the SSRF
  rules) and :mod:`labelstudio.storage` (images in cloud storage);
* :mod:`labelstudio.urls`: how a URL is read (scheme, origin, redacted form);
* :mod:`labelstudio.labelconfig`: what to segment in a project's label config;
* :mod:`labelstudio.codecs`: masks to and from results (brush RLE, polygons);
* :mod:`labelstudio.prompts`: smart keypoints and rectangles, parsed and grouped into objects;
* :mod:`labelstudio.writeback`: predictions written to Label Studio in bulk.

It may import :mod:`contracts` and :mod:`sam2unet`, nothing else of ours
(tests/test_layers.py); the services (backend, worker, trainer), ``cli``, ``launcher`` and
``bench`` import it.
"""
