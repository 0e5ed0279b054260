"""Put this folder on PYTHONPATH to run any Python process (a notebook's kernel included) as if on a
machine with one CUDA GPU: `PYTHONPATH=tests/fake_cuda_site pytest --nbval-lax notebooks`. See
tests/fake_cuda.py for what that checks."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fake_cuda  # noqa: E402

ACTIVE = fake_cuda.fake_cuda()  # kept for the whole process: a context left to the garbage collector would close
ACTIVE.__enter__()
