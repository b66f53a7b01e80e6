"""Data-parallel training over several processes with ``torch.distributed``.

One process per device, each holding a replica of the model; DDP averages the trainable
parameters' gradients after every backward pass (NCCL between GPUs, gloo between CPU
processes). The processes of one machine are started by torch's own elastic launcher
(:func:`torch.distributed.launcher.api.elastic_launch`, what ``torchrun`` runs), with a c10d
rendezvous on a free local port. Across machines, either ``torchrun`` starts them and
:func:`~sam2unet.distributed.launcher.joined_from_torchrun` picks the process group up from its
environment, or each machine's launcher is given the same
:class:`~sam2unet.distributed.launcher.Cluster` (a c10d rendezvous that one machine hosts), which is
how a trainer round spans machines (:mod:`trainer.cluster`).

Devices (``SAM2UNET_TRAIN_DEVICES`` / ``train --devices``), see
:func:`~sam2unet.distributed.launcher.parse_devices`:

======================= =============================================================
(empty)                 one process on the single device (``SAM2UNET_DEVICE``), as before
``auto``                one process per visible GPU; one process on the CPU without a GPU
``cuda:0,cuda:1,...``   one process per listed GPU
``cpu:N``               N processes on the CPU (gloo); for tests and CPU-only machines
======================= =============================================================

What makes N processes train like one (see :func:`sam2unet.training.train`):

- the global batch stays ``batch_size``: each rank takes ``batch_size / N`` samples of the
  same global batch (a :class:`~torch.utils.data.DistributedSampler` with the run's seed, also
  used by a single process, so the sample order is the same for any N);
- BatchNorm in the decoder normalises over the global batch: ``torch.nn.SyncBatchNorm`` on GPUs,
  :class:`~sam2unet.distributed.ddp.GlobalBatchNorm2d` (the same computation with gloo's
  differentiable all-reduce) on CPUs;
- the frozen trunk is left out of DDP (its parameters have ``requires_grad=False``, which DDP
  never puts in its gradient buckets, and they are also named in DDP's ignore list so they are
  not broadcast at start: every rank loads the same checkpoint);
- held-out evaluation is sharded (image ``i`` on rank ``i % N``) and rank 0 scores the gathered
  per-image maps in dataset order, exactly as one process would.

Modules: :mod:`~sam2unet.distributed.collectives` (ranks, and the collectives the loop and the
evaluation call), :mod:`~sam2unet.distributed.ddp` (the model's side: BatchNorm over the global
batch and the DDP wrapper), :mod:`~sam2unet.distributed.launcher` (devices, clusters and the
elastic launcher that starts the processes).
"""
