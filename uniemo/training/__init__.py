"""Training: task modules (``task``), the DeepSpeed engine, the loop, checkpoints, the driver of ``uniemo train``.

Nothing is imported here, so that ``uniemo --help`` and the data commands do not pay for importing torch.
"""
