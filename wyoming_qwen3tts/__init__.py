"""Wyoming text-to-speech server for Qwen3-TTS."""

import os

# Before anything imports torch. Until the engine sets its thread counts, PyTorch runs on one
# OpenMP thread per core, so importing and loading on the main thread leave it a team whose
# threads live on. The model runs on a thread of its own; once it starts a team too there are
# more OpenMP threads than cores, libgomp then stops spinning between parallel regions, and every
# operation of a multi-threaded prefill waits for a sleeping thread to wake (2 cores: an int8
# prefill took as long on two threads as on one; with this, 1.3-1.8x less). Thread counts are set
# explicitly later (`torch.set_num_threads`). It also keeps numpy's OpenBLAS to one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "0.1.0"
