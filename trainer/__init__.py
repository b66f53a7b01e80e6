"""The trainer service: webhook events and schedules become training rounds, rounds become
promoted model versions, and new versions' predictions go back to Label Studio.

* :mod:`trainer.service`: the service: events in, rounds, promotion, re-prediction;
* :mod:`trainer.inbox`: its side of the event stream (consumer group, takeover);
* :mod:`trainer.projects`: per-project state: what triggers a round and when it is due;
* :mod:`trainer.schedule`: scheduled rounds (rq's cron scheduler);
* :mod:`trainer.round`: one round: train, evaluate candidate and current, promote or not;
* :mod:`trainer.round_training`: the training part of a round, the same on every machine;
* :mod:`trainer.cluster`: rounds over several machines (the trainer and its train agents);
* :mod:`trainer.promotion`: held-out sides and the promotion decision;
* :mod:`trainer.dataset`, :mod:`trainer.annotated_tasks`, :mod:`trainer.samples`: the training
  set derived from a project's annotations;
* :mod:`trainer.prompt_masks`: masks for annotations that hold smart prompts but no mask;
* :mod:`trainer.plots`: training and versions plots.

It may import :mod:`contracts`, :mod:`labelstudio`, :mod:`modelstore` and :mod:`sam2unet`,
never :mod:`backend` or :mod:`worker` (tests/test_layers.py); ``cli`` and ``bench`` import
it (``launcher`` starts it as a process).
"""
