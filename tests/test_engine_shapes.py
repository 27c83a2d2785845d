"""The warmup compiles every graph the engine can run: a real session (tiny model, CPU kernels) driven by the
real scheduler and runner through random workloads never compiles a graph after the warmup, with one graph for
every step size (the kernels' shape functions) or one per padded size (without them).

Each case runs in a fresh interpreter: in a process that has already compiled other sessions' graphs (the
MindSpore-ops sessions of test_model_inference), MindSpore compiled the dynamic graph a second time, a one-off
cost of a test process (a server has one session) that would make this test's count depend on test order."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from model.runtime import set_device
from model_helpers import hf_model, our_model_from_hf
from serving.config import EngineConfig
from serving.engine.core import EngineCore
from serving.engine.model_runner import ModelRunner, step_shapes, warmup
from serving.engine.scheduler import SchedulerConfig
from serving.engine.sequence import Sequence
from serving.sampling_params import SamplingParams


@pytest.mark.parametrize("case", ["one-graph", "per-size-graphs"])
def test_a_random_workload_compiles_nothing_after_the_warmup(case):
    here = Path(__file__)
    proc = subprocess.run([sys.executable, str(here), case], cwd=here.parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "workload ok" in proc.stdout


def check(dynamic: bool) -> None:
    from model import InferenceSession, kernels

    set_device("CPU")
    if dynamic:
        assert kernels.dynamic_shapes(), "the kernel library has no shape functions (no C++ compiler?)"
    else:
        kernels.dynamic_shapes = lambda: False
    config = EngineConfig(max_batch_size=4, max_total_tokens=128, max_batched_tokens=32, prefill_chunk=16)
    sess = InferenceSession(our_model_from_hf(hf_model(seed=2)), num_slots=4, max_seq_len=128,
                            batch_buckets=config.batch_buckets, chunk_buckets=config.chunk_buckets,
                            packed_weights=True)
    assert sess.cpu_kernels and sess.dynamic == dynamic
    ran: list[tuple[int, int | None]] = []
    run = sess._run

    def record(ids, pos, write, base, context, rows):
        ran.append((ids.shape[1], None if rows is None else int(rows.shape[0])))
        return run(ids, pos, write, base, context, rows)

    sess._run = record
    assert warmup(sess) == len(step_shapes(sess))
    compiled = set(ran)
    assert compiled == set(step_shapes(sess))
    def graph_count():  # MindSpore's compiled phases of the step cell (and of its fixed-shape single-token view)
        return len(sess._cell.compile_cache) + (len(sess._single.compile_cache) if sess._single is not None else 0)

    graphs = graph_count()
    assert graphs == (2 if dynamic else len(compiled))
    ran.clear()

    core = EngineCore(ModelRunner(sess, eos_token_id=0),
                      SchedulerConfig(num_slots=4, max_waiting=100, max_step_tokens=config.max_step_tokens,
                                      prefill_chunk=config.prefill_chunk),
                      lambda i: bytes([i % 256]))
    rng = random.Random(0)
    n = 0
    for _ in range(60):
        for _ in range(rng.choice((0, 0, 1, 2, 3))):
            params = SamplingParams(max_new_tokens=rng.choice((0, 1, 3, 8)), temperature=0.0, ignore_eos=True,
                                    prompt_logprobs=rng.choice((None, None, 1)))
            prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, 60))]
            core.add([Sequence(f"r{n}", prompt, params)])
            n += 1
        core.step()
    while core.has_work():
        core.step()
    assert n > 40 and len(set(ran)) >= 8  # the workload reached many shapes
    assert graph_count() == graphs
    if not dynamic:
        assert set(ran) <= compiled, sorted(set(ran) - compiled)
    print("workload ok")


if __name__ == "__main__":
    check(sys.argv[1] == "one-graph")
