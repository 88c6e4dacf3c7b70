"""``fdistill.engine.memory.peak_allocated_bytes``: the high-water mark of tensor bytes allocated
above the start, golden values on CPU (the profiler's records are exact byte counts) and on CUDA
where there is one (the caching allocator rounds each block up to 512 bytes)."""
import pytest
import torch

from fdistill.engine.memory import peak_allocated_bytes

SLACK = 64 * 1024  # bytes: allocator rounding and small bookkeeping tensors, never a whole buffer


def _nested():
    a = torch.empty(1_000_000)  # float32: 4,000,000 bytes
    b = torch.empty(500_000)  # +2,000,000 while a is alive -> 6,000,000
    del a, b


def _sequential():
    for _ in range(2):
        a = torch.empty(1_000_000)  # 4,000,000 bytes, freed before the next
        del a


def test_cpu_high_water_mark_of_two_live_tensors():
    peak = peak_allocated_bytes(_nested, torch.device("cpu"))
    assert 6_000_000 <= peak < 6_000_000 + SLACK


def test_cpu_freed_memory_is_not_counted_twice():
    peak = peak_allocated_bytes(_sequential, "cpu")
    assert 4_000_000 <= peak < 4_000_000 + SLACK  # the peak, not the 8 MB allocated in total


def test_cpu_tensors_alive_before_the_call_are_not_counted():
    live = torch.empty(3_000_000)  # 12 MB already live
    assert peak_allocated_bytes(lambda: None, "cpu") < SLACK
    peak = peak_allocated_bytes(lambda: live + 1, "cpu")  # the 12 MB result only, not the 12 MB input
    assert 12_000_000 <= peak < 12_000_000 + SLACK


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="cpu or cuda"):
        peak_allocated_bytes(lambda: None, "meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_allocator_peak_above_the_start():
    dev = torch.device("cuda")
    live = torch.empty(3_000_000, device=dev)  # live before: not counted

    def nested():
        a = torch.empty(1_000_000, device=dev)
        b = torch.empty(500_000, device=dev)
        del a, b

    def sequential():
        for _ in range(2):
            a = torch.empty(1_000_000, device=dev)
            del a

    assert 6_000_000 <= peak_allocated_bytes(nested, dev) < 6_000_000 + SLACK
    assert 4_000_000 <= peak_allocated_bytes(sequential, dev) < 4_000_000 + SLACK
    assert 12_000_000 <= peak_allocated_bytes(lambda: live + 1, dev) < 12_000_000 + SLACK
