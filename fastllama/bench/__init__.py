"""Benchmarks users can run: ``fastllama bench [train|decode|ops|memory]``.

* :mod:`.train`: tokens/s and peak memory of full training steps, HF vs fastllama and friends;
* :mod:`.memory`: bytes saved for backward per token per layer (device-independent);
* :mod:`.common`: timing, measured peaks and the shared results format;
* :mod:`.cli`: the ``fastllama bench`` subcommand (op and decode benchmarks are the scripts in
  the repository's ``benchmarks/`` folder, run through their ``main``).

Importing this package is cheap: nothing here imports triton or transformers at import time.
"""
