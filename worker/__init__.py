"""The worker service: rq workers that run the model, one per device, for the jobs the backend
and the pre-annotation runs queue.

* :mod:`worker.process`: the worker process (an rq SimpleWorker with a short job lease);
* :mod:`worker.jobs`: the job functions rq runs (named by string in :mod:`contracts.jobs`);
* :mod:`worker.runtime`: the model of one process, reloaded when the current version moves;
* :mod:`worker.pipeline`: one predict job: fetch images, predict in device batches, encode;
* :mod:`worker.prompt_parsing`, :mod:`worker.answer_with_head`,
  :mod:`worker.answer_without_head`: interactive prompts, answered by SAM2's prompt head or by
  crop-and-segment around the U-Net;
* :mod:`worker.embeddings`: the cache of SAM2 image features;
* :mod:`worker.preannotate`, :mod:`worker.run_pages`, :mod:`worker.diverse_order`:
  project-wide pre-annotation runs (counters, write buffer, pages, the ``diverse`` order).

It may import :mod:`contracts`, :mod:`labelstudio`, :mod:`modelstore` and :mod:`sam2unet`,
never :mod:`backend` or :mod:`trainer` (tests/test_layers.py); ``cli`` and ``bench`` import
it (``launcher`` starts it as a process).
"""
